"""`fleetctl device`: devices as they reported themselves (hello, status, events)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import enroll, fleet, views
from ..audit import audit
from ._common import (
    JSON_HELP,
    actor,
    console,
    fmt_bytes,
    fmt_time,
    load_config,
    open_store,
    print_json,
)

app = typer.Typer(no_args_is_help=True, help="Devices in the fleet.")


@app.command("list")
def list_cmd(
    group: Annotated[
        str | None, typer.Option(help="Only devices the named group's selector matches.")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List devices: online state, profile, labels and the models they run."""
    with open_store() as store, store.read() as s:
        devices = (fleet.devices_in_group(s, group) if group is not None
                   else fleet.list_devices(s))
        rows = [views.device_to_json(d) for d in devices]
    if json_:
        print_json(rows)
        return
    table = Table("id", "online", "last seen", "arch", "os", "accelerator", "labels", "models")
    for d in rows:
        p = d["profile"]
        table.add_row(
            d["id"],
            "[green]yes[/green]" if d["online"] else "[red]no[/red]",
            fmt_time(d["last_seen"]),
            p["arch"] or "-",
            p["os"] or "-",
            p["accelerator"] or "-",
            ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "-",
            ", ".join(f"{m['model']}:{m['version'] or '?'}" for m in d["models"]) or "-",
        )
    console.print(table if rows else "no devices")


@app.command("show")
def show(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id.")],
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Show one device: profile, labels, presence and each model it runs (with sha256)."""
    with open_store() as store, store.read() as s:
        d = views.device_to_json(fleet.get_device(s, device_id))
    if json_:
        print_json(d)
        return
    p = d["profile"]
    table = Table(title=f"device {d['id']}", title_justify="left", show_header=False)
    table.add_column("field", style="dim")
    table.add_column("value", overflow="fold")
    table.add_row("online", "yes" if d["online"] else "no")
    table.add_row("last seen", fmt_time(d["last_seen"]))
    table.add_row("hardware id", d["hardware_id"] or "-")
    table.add_row("agent", d["agent_version"] or "-")
    for key in ("arch", "os", "cpu", "accelerator"):
        table.add_row(key, p[key] or "-")
    table.add_row("memory", fmt_bytes(p["memory_bytes"]))
    table.add_row("disk free", fmt_bytes(p["disk_free_bytes"]))
    table.add_row("runtimes", ", ".join(f"{k} {v}" for k, v in sorted(p["runtimes"].items()))
                  or "-")
    table.add_row("labels", ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "-")
    console.print(table)
    models = Table("model", "version", "variant", "since")
    models.add_column("sha256", overflow="fold")
    for m in d["models"]:
        models.add_row(m["model"], m["version"] or "-", m["variant"] or "-",
                       fmt_time(m["updated_at"]), m["sha256"])
    console.print(models if d["models"] else "runs no reported models")


@app.command("enroll")
def enroll_cmd(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id (certificate CN).")],
    out: Annotated[Path | None, typer.Option(
        help="Bundle directory (default: ./enroll-ID).")] = None,
    broker_url: Annotated[str | None, typer.Option(
        help="mqtts:// URL the device connects to (default: FLEET_MQTT_URL).")] = None,
    install_dir: Annotated[str, typer.Option(
        help="Where the bundle's files will live on the device (for agent.toml).")
    ] = "/etc/deltafleet",
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Issue a client certificate and write an enrollment bundle: client.crt/key, ca.crt,
    root.json (the root of trust to pin), trust.json (current key list) and agent.toml.
    The bundle holds a private key: copy it to the device over a trusted channel, then delete."""
    cfg = load_config()
    result = enroll.enroll_device(cfg, device_id, out or Path(f"enroll-{device_id}"),
                                  broker_url=broker_url, install_dir=install_dir)
    with open_store(cfg) as store, store.session() as s:
        audit(s, actor(), "device.enroll", device_id,
              {"serial": str(result.serial), "broker_url": result.broker_url})
    if json_:
        print_json({"device_id": device_id, "directory": str(result.directory),
                    "serial": str(result.serial), "files": [str(f) for f in result.files]})
        return
    console.print(f"enrolled {device_id}: bundle in {result.directory}")


@app.command("revoke")
def revoke_cmd(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id.")],
    reason: Annotated[str, typer.Option(help="Recorded in the deny list and audit log.")] = "",
) -> None:
    """Deny the device on the server and put its certificates on the CRL. Reload the broker
    (restart Mosquitto) so it reads the new CRL."""
    cfg = load_config()
    serials = enroll.revoke_device(cfg, device_id, reason=reason)
    with open_store(cfg) as store, store.session() as s:
        audit(s, actor(), "device.revoke", device_id,
              {"serials": [str(x) for x in serials], "reason": reason})
    console.print(f"revoked {device_id}: {len(serials)} certificate(s) on the CRL; "
                  "reload the broker to apply it")
