"""`fleetctl store verify`: re-hash every blob of the server's store, name what depends on the
bad ones, and (``--repair``) rebuild or re-import them. Exit 1 while a blob is bad."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..audit import audit
from ..errors import UsageError
from ..storecheck import repair, verify_store
from ._common import JSON_HELP, actor, blob_store, console, err_console, load_config, open_store, print_json
from .table import Table

app = typer.Typer(no_args_is_help=True, help="The server's blob store.")


@app.command("verify")
def verify(
    repair_: Annotated[bool, typer.Option(
        "--repair", help="Rebuild bad compressed forms and deltas from their intact sources; "
        "restore bad model files from the files given with --from.")] = False,
    sources: Annotated[list[Path] | None, typer.Option(
        "--from", help="A model file to restore a missing or corrupt model blob from (its "
        "sha256 must be the blob's name). Repeat for more.")] = None,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Re-hash every blob the catalog knows; list the missing and corrupt ones with the
    variants, deltas and active rollouts that depend on them. Exit 1 when one is still bad.
    Held rollout targets resume by themselves once their blob is intact again."""
    for src in sources or []:
        if not src.is_file():
            raise UsageError(f"no such file: {src}")
    if sources and not repair_:
        raise UsageError("--from is only used with --repair")
    cfg = load_config()
    blobs = blob_store(cfg)
    with open_store(cfg) as store, store.session() as s:
        with err_console.status("hashing every blob"):
            reports = verify_store(s, blobs, cfg.chunk_size_bytes)
        bad_before = [r for r in reports if r.status != "ok"]
        if repair_ and bad_before:
            with err_console.status("repairing"):
                repair(s, blobs, reports, list(sources or []), cfg.home / "work")
            audit(s, actor(), "store.repair", "store", {
                r.sha256: {"status": r.status, "repair": r.repair} for r in bad_before})
    bad = [r for r in reports if r.status not in ("ok", "repaired")]
    if json_:
        print_json({"checked": len(reports), "ok": sum(r.status == "ok" for r in reports),
                    "bad": len(bad), "blobs": [r.to_json() for r in bad_before]})
    elif not bad_before:
        console.print(f"all {len(reports)} blobs intact")
    else:
        table = Table("sha256", "kind", "status", "problem", "depends on it", "repair",
                      wide=True)
        for r in bad_before:
            table.add_row(r.sha256[:12], r.kind, r.status, r.problem, r.dependents.summary(),
                          r.repair)
        console.print(table)
        console.print(f"{len(reports)} blobs checked, {len(bad)} bad"
                      + (f", {len(bad_before) - len(bad)} repaired" if repair_ else ""))
    if bad:
        raise typer.Exit(1)
