"""`fleetctl rollout ...`: start a rollout, watch it, list them.

Exit codes: 0 ok (and, with --wait, the rollout completed), 1 the rollout failed or --wait timed
out, 2 bad input (unknown group or version, ...).
"""

from __future__ import annotations

import contextlib
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..rollouts import (
    FINAL_ROLLOUT_STATES,
    create_rollout,
    get_rollout,
    list_rollouts,
    rollout_json,
)
from ..store import Store
from ._common import actor, fmt_bytes, open_store, print_json

app = typer.Typer(no_args_is_help=True, help="Roll model versions out to device groups.")
console = Console(highlight=False)


def _print_status(data: dict) -> None:
    console.print(f"rollout {data['id']}: {data['model']} {data['version']} -> group "
                  f"{data['group']}  [bold]{data['state']}[/bold]")
    table = Table("device", "state", "variant", "artifact", "sent", "full", "running", "reason")
    for t in data["targets"]:
        table.add_row(t["device"], t["state"], t["variant"] or "-", t["artifact"] or "-",
                      fmt_bytes(t["bytes_sent"]), fmt_bytes(t["full_bytes"]),
                      (t["running_sha256"] or "-")[:12], t["reason"] or "")
    console.print(table)
    if data["full_bytes"]:
        pct = 100 * data["bytes_sent"] / data["full_bytes"]
        console.print(f"bytes sent {fmt_bytes(data['bytes_sent'])} of "
                      f"{fmt_bytes(data['full_bytes'])} full ({pct:.1f}%)")


@app.command("model")
def rollout_model(
    spec: Annotated[str, typer.Argument(help="[NAME:]VERSION to roll out")],
    group: Annotated[str, typer.Option("--group", "-g", help="device group to target")],
    wait: Annotated[bool, typer.Option("--wait", help="block until the rollout finishes")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout", help="seconds --wait waits")] = 600,
    allow_empty: Annotated[bool, typer.Option(
        "--allow-empty", help="allow a group with no device yet")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Start a rollout; a running `fleetctl server` delivers it."""
    with open_store() as store:
        with store.session() as s:
            rollout_id = create_rollout(s, spec, group, actor(), allow_empty=allow_empty).id
        if not as_json:
            console.print(f"rollout {rollout_id} started")
        if not wait:
            if as_json:
                print_json({"id": rollout_id})
            return
        _wait(store, rollout_id, timeout_s, quiet=as_json)
        with store.session() as s:
            data = rollout_json(s, get_rollout(s, rollout_id))
    if as_json:
        print_json(data)
    else:
        _print_status(data)
    if data["state"] != "completed":
        raise typer.Exit(1)


def _wait(store: Store, rollout_id: int, timeout_s: float, *, quiet: bool) -> None:
    deadline = time.monotonic() + timeout_s
    status = console.status("waiting for devices...") if not quiet else contextlib.nullcontext()
    with status as st:
        while True:
            with store.session() as s:
                data = rollout_json(s, get_rollout(s, rollout_id), with_targets=False)
            if st is not None:
                st.update(f"rollout {rollout_id}: {data['state']} {data['counts']}")
            if data["state"] in FINAL_ROLLOUT_STATES:
                return
            if time.monotonic() > deadline:
                console.print(f"[red]timed out after {timeout_s:.0f} s[/red]")
                return
            time.sleep(0.5)


@app.command("status")
def rollout_status(
    rollout_id: Annotated[int, typer.Argument(help="rollout id")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show each device's state and the bytes sent against the full size."""
    with open_store() as store, store.session() as s:
        data = rollout_json(s, get_rollout(s, rollout_id))
    if as_json:
        print_json(data)
    else:
        _print_status(data)


@app.command("list")
def rollout_list(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List rollouts, newest first."""
    with open_store() as store, store.session() as s:
        rows = [rollout_json(s, r, with_targets=False) for r in list_rollouts(s)]
    if as_json:
        print_json(rows)
        return
    table = Table("id", "model", "version", "group", "state", "devices", "sent", "full")
    for r in rows:
        table.add_row(str(r["id"]), r["model"], r["version"], r["group"], r["state"],
                      str(sum(r["counts"].values())), fmt_bytes(r["bytes_sent"]),
                      fmt_bytes(r["full_bytes"]))
    console.print(table)
