"""`fleetctl group`: device groups defined by label / profile selectors."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..errors import UsageError
from . import remote
from ._common import JSON_HELP, WIDE_HELP, actor, console, fmt_selector, open_store, print_json
from .table import Table

app = typer.Typer(no_args_is_help=True, help="Device groups (label and profile selectors).")


def parse_matches(matches: list[str]) -> dict[str, str | list[str]]:
    """``["arch=aarch64", "hw in (jetson, xavier)"]`` -> a selector; UsageError for bad or
    repeated keys."""
    from .. import fleet  # noqa: PLC0415

    selector: dict[str, str | list[str]] = {}
    for item in matches:
        key, value = fleet.parse_match(item)
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
                          "have, KEY=VALUE, or any of several: 'KEY in (A, B)'; repeat for "
                          "more (all must hold)."),
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
    if remote.active():
        out = remote.client().post("/groups", {"name": name, "match": matches,
                                               "all": all_devices})
    else:
        out = _create(name, parse_matches(matches))
    shown = fmt_selector(out["selector"]) or "all devices"
    console.print(f"created group {out['name']} ({shown}); matches {len(out['devices'])} "
                  "device(s) now")


def _create(name: str, selector: dict[str, str | list[str]]) -> dict[str, Any]:
    from .. import fleet, views  # noqa: PLC0415
    from ..audit import audit  # noqa: PLC0415

    with open_store() as store, store.session() as s:
        group = fleet.create_group(s, name, selector)
        members = [d.id for d in fleet.devices_in_group(s, name)]
        audit(s, actor(), "group.create", name, {"selector": selector})
        return views.group_to_json(group, members)


@app.command("list")
def list_cmd(
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List groups with their selectors and the devices they match now."""
    rows = remote.client().get("/groups") if remote.active() else _list()
    if json_:
        print_json(rows)
        return
    table = Table("group", "devices", wide=wide)
    table.add_column("selector", overflow="fold")
    for g in rows:
        table.add_row(g["name"], str(len(g["devices"])),
                      fmt_selector(g["selector"]) or "(all)")
    console.print(table if rows else "no groups; create one with `fleetctl group create`")


def _list() -> list[dict[str, Any]]:
    from .. import fleet, views  # noqa: PLC0415

    with open_store() as store, store.read() as s:
        devices = fleet.list_devices(s)
        return [views.group_to_json(g, [d.id for d in devices
                                        if fleet.device_matches(d, g.selector)])
                for g in fleet.list_groups(s)]


def _show(name: str) -> dict[str, Any]:
    from .. import views  # noqa: PLC0415

    with open_store() as store, store.read() as s:
        return views.group_show_json(s, name)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Group name.")],
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Show a group: its selector and the devices it matches now (what each runs)."""
    out = (remote.client().get(f"/groups/{remote.quote_part(name)}") if remote.active()
           else _show(name))
    members = out["members"]
    if json_:
        print_json(out)
        return
    console.print(f"group {out['name']}: {fmt_selector(out['selector']) or '(all)'}; "
                  f"{len(members)} device(s)")
    if not members:
        return
    table = Table("device", "online", "runs", "asked", *(["labels"] if wide else []),
                  wide=wide)
    for d in out["members"]:
        runs = ", ".join(f"{m['model']}:{m['version'] or '?'}" for m in d["running"]) or "-"
        asked = ", ".join(f"{x['version']} r{x['rollout_id']} {x['state']}"
                          for x in d["desired"]) or "-"
        labels = ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "-"
        table.add_row(d["id"], "yes" if d["online"] else "no", runs, asked,
                      *([labels] if wide else []))
    console.print(table)
