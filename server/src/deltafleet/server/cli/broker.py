"""`fleetctl broker`: a Mosquitto configuration with per-device TLS identities and ACLs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import enroll
from ._common import console, load_config

app = typer.Typer(no_args_is_help=True, help="The MQTT broker's configuration.")


@app.command("config")
def config(
    out: Annotated[Path, typer.Option(help="Directory for mosquitto.conf, acl and TLS files.")],
    port: Annotated[int, typer.Option(help="TLS listener port.")] = 8883,
    bind: Annotated[str | None, typer.Option(help="Listen address (default: all).")] = None,
    host: Annotated[list[str] | None, typer.Option(
        help="DNS name or IP devices use to reach the broker (repeatable; default: the host "
             "of FLEET_MQTT_URL).")] = None,
    persistence_dir: Annotated[Path | None, typer.Option(
        help="Keep retained messages here across broker restarts.")] = None,
) -> None:
    """Write mosquitto.conf (TLS only, client certificate required, CN = username, CRL, ACL)
    and the ACL file; creates the fleet CA, the broker certificate and the server's identity
    if missing. Run the broker with `mosquitto -c OUT/mosquitto.conf`."""
    cfg = load_config()
    files = enroll.write_broker_config(cfg, out, port=port, bind=bind, hosts=host or None,
                                       persistence_dir=persistence_dir)
    console.print(f"wrote {files.conf}, {files.acl} and TLS files in {out}")
    console.print(f"server identity {cfg.server_identity}: {files.server_cert} (used by "
                  "`fleetctl server` when FLEET_MQTT_URL is mqtts://)")
