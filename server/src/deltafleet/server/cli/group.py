"""`fleetctl group`: device groups defined by label / profile selectors."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import fleet, views
from ..audit import audit
from ..errors import UsageError
from ._common import JSON_HELP, actor, console, open_store, print_json
from .table import Table

app = typer.Typer(no_args_is_help=True, help="Device groups (label and profile selectors).")


def parse_matches(matches: list[str]) -> dict[str, str]:
    """``["arch=aarch64", "site=b"]`` -> a selector; UsageError for bad or repeated keys."""
    selector: dict[str, str] = {}
    for item in matches:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UsageError(f"invalid --match {item!r}: use KEY=VALUE")
        if key in selector:
            raise UsageError(f"--match {key} is given twice")
        selector[key] = value
    return fleet.check_selector(selector)


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Group name, e.g. 'jetson'.")],
    match: Annotated[
        list[str] | None,
        typer.Option("--match", metavar="KEY=VALUE",
                     help="Label or profile field (arch, os, accelerator, cpu) a device must "
                          "have; repeat for more (all must hold)."),
    ] = None,
    all_devices: Annotated[
        bool, typer.Option("--all", help="Match every device (instead of --match).")
    ] = False,
) -> None:
    """Create a group of the devices matching every --match (or --all devices)."""
    matches = match or []
    if not matches and not all_devices:
        raise UsageError("give at least one --match KEY=VALUE, or --all for every device")
    if matches and all_devices:
        raise UsageError("--all and --match exclude each other")
    selector = parse_matches(matches)
    with open_store() as store, store.session() as s:
        group = fleet.create_group(s, name, selector)
        n = len(fleet.devices_in_group(s, name))
        audit(s, actor(), "group.create", name, {"selector": selector})
    shown = ", ".join(f"{k}={v}" for k, v in selector.items()) or "all devices"
    console.print(f"created group {group.name} ({shown}); matches {n} device(s) now")


@app.command("list")
def list_cmd(json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """List groups with their selectors and the devices they match now."""
    with open_store() as store, store.session() as s:
        devices = fleet.list_devices(s)
        rows = [
            views.group_to_json(
                g, [d.id for d in devices if fleet.device_matches(d, g.selector)]
            )
            for g in fleet.list_groups(s)
        ]
    if json_:
        print_json(rows)
        return
    table = Table("group", "selector", "devices")
    for g in rows:
        table.add_row(g["name"],
                      ", ".join(f"{k}={v}" for k, v in g["selector"].items()) or "(all)",
                      str(len(g["devices"])))
    console.print(table if rows else "no groups; create one with `fleetctl group create`")
