"""`fleetctl device`: devices as they reported themselves (hello, status, events)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .. import registry
from ._common import JSON_HELP, console, fmt_bytes, fmt_time, open_store, print_json

app = typer.Typer(no_args_is_help=True, help="Devices in the fleet.")


@app.command("list")
def list_cmd(
    group: Annotated[
        str | None, typer.Option(help="Only devices the named group's selector matches.")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List devices: online state, profile, labels and the models they run."""
    with open_store() as store, store.session() as s:
        devices = (registry.devices_in_group(s, group) if group is not None
                   else registry.list_devices(s))
        rows = [registry.device_to_json(d) for d in devices]
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
    with open_store() as store, store.session() as s:
        d = registry.device_to_json(registry.get_device(s, device_id))
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
