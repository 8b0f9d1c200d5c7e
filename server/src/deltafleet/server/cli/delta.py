"""`fleetctl delta ...`: pre-build deltas between model versions and inspect the cached ones.

A built delta is stored exactly as the server daemon stores its own (blob + ``artifacts`` row
of kind "delta" + ``deltas`` row), so a later rollout finds and ships it without rebuilding.
``list`` also shows the pairs the running server is building or failed to build
(``delta_views``).

``list`` and ``show`` go through the management API when FLEET_API_URL is set (``GET
/api/v1/deltas``, the same JSON); ``build`` works on the server's host only (it needs the
blob store) and refuses there in one line.

Exit codes: 0 ok (also when no delta beats the full model: the full model will then be sent);
1 the build failed for another reason (not your input); 2 bad input (invalid spec, unknown
model, version or variant, unknown delta id).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from . import remote
from ._common import WIDE_HELP, console, fmt_bytes, print_json
from .table import Table

app = typer.Typer(no_args_is_help=True, help="Build and inspect model deltas.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
SPEC_HELP = "NAME:VERSION[/VARIANT] (variant defaults to 'default', or the only one)"


@app.command("build")
def build(
    base_spec: Annotated[str, typer.Argument(help=f"base: {SPEC_HELP}")],
    target_spec: Annotated[str, typer.Argument(help=f"target: {SPEC_HELP}")],
    memory_budget_mb: Annotated[int | None, typer.Option(
        "--memory-budget-mb", help="skip codecs predicted to need more memory (MiB; "
        "default: the server's budget, 1024)")] = None,
    time_budget_s: Annotated[float | None, typer.Option(
        "--time-budget-s", help="skip codecs predicted to take longer (seconds; default: "
        "the server's budget, 60)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Build the smallest verified delta from BASE to TARGET and cache it for rollouts."""
    remote.local_only("delta build")
    from ._delta_build import build_delta  # noqa: PLC0415 - codecs, numpy, SQLAlchemy

    build_delta(base_spec, target_spec, memory_budget_mb, time_budget_s, json_out)


def _load(model: str | None = None, delta_id: int | None = None) -> list[dict[str, Any]]:
    """Deltas as ``--json`` prints them: from the API when FLEET_API_URL is set, else the
    local store (and the local server's builds file)."""
    if remote.active():
        api = remote.client()
        if delta_id is not None:
            return [api.get(f"/deltas/{delta_id}")]
        return api.get_all("/deltas", {"model": model})
    from .. import delta_views  # noqa: PLC0415
    from ._common import load_config, open_store  # noqa: PLC0415

    cfg = load_config()
    with open_store(cfg) as store, store.read() as s:
        if delta_id is not None:
            return [delta_views.show_delta(s, delta_id)]
        return delta_views.list_deltas(s, cfg.home, model=model)


@app.command("list")
def list_deltas(
    model: Annotated[str | None, typer.Option(
        "--model", help="Only deltas from or to a version of this model.")] = None,
    wide: Annotated[bool, typer.Option(
        "--wide", help="Show base and target sha256 in full, and the build seconds.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List deltas: cached ones (base, target, codec, size vs the target's full artifact, the
    compressed model when it is smaller), then those the server is building or failed to."""
    rows = _load(model=model)
    if json_out:
        print_json(rows)
        return
    table = Table("id", "base", "target", "state", "codec", "size", "%full",
                  *(["secs"] if wide else []), wide=wide)
    table.add_column("reason", overflow="below")  # under its row: 80 columns hold the rest
    n = 64 if wide else 12
    for r in rows:
        secs = "-" if r["build_seconds"] is None else f"{r['build_seconds']:.1f}"
        table.add_row("-" if r["id"] is None else str(r["id"]),
                      r["base"] or r["base_sha256"][:n], r["target"] or r["target_sha256"][:n],
                      r["state"], r["codec"] or "-", fmt_bytes(r["size_bytes"]),
                      f"{100 * r['ratio']:.1f}" if r["ratio"] is not None else "-",
                      *([secs] if wide else []),
                      r["reason"] or ("" if r["worth_sending"] is not False
                                      else "not worth sending: the full artifact is used"))
    console.print(table if rows else "no deltas")


@app.command("show")
def show(
    delta_id: Annotated[int, typer.Argument(help="delta id (see `fleetctl delta list`)")],
    json_out: JsonOpt = False,
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
) -> None:
    """Show one cached delta (--wide: long values on one line, not folded)."""
    (data,) = _load(delta_id=delta_id)
    if json_out:
        print_json(data)
        return
    table = Table("field", show_header=False, wide=wide)
    table.add_column("value", overflow="fold")
    for k, v in data.items():
        if (k.endswith("size_bytes") or k.endswith("artifact_bytes")) and isinstance(v, int):
            v = f"{fmt_bytes(v)} ({v})"
        table.add_row(k, "-" if v is None else str(v))
    console.print(table)
