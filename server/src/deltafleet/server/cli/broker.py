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
        help="Where the broker keeps sessions and retained messages across restarts and "
             "crashes (default: OUT/persistence).")] = None,
    server_id: Annotated[list[str] | None, typer.Option(
        "--server-id", help="Identity of one more server replica (repeatable; run it with "
                            "FLEET_SERVER_ID=ID). Each gets its own certificate and the ACL "
                            "of the server.")] = None,
) -> None:
    """Write mosquitto.conf (TLS only, client certificate required, CN = username = client
    id, CRL, ACL, persistence) and the ACL file; creates the fleet CA, the broker certificate
    and the server identities if missing (with several, also the replicas' secret share group
    in $FLEET_HOME/share-group). Run the broker with `mosquitto -c OUT/mosquitto.conf`."""
    cfg = load_config()
    files = enroll.write_broker_config(cfg, out, port=port, bind=bind, hosts=host or None,
                                       persistence_dir=persistence_dir,
                                       server_ids=server_id or ())
    console.print(f"wrote {files.conf}, {files.acl} and TLS files in {out}")
    for identity in enroll.server_identities(cfg):
        crt, _ = enroll.server_cert_paths(cfg, identity)
        console.print(f"server identity {identity}: {crt} (FLEET_SERVER_ID={identity}; used by "
                      "`fleetctl server` when FLEET_MQTT_URL is mqtts://)")
    if (cfg.home / "share-group").exists():
        console.print(f"replicas' secret share group: {cfg.home / 'share-group'} (keep it "
                      "private; every replica needs the same file or FLEET_SHARE_GROUP)")
