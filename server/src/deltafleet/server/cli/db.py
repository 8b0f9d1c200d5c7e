"""`fleetctl db`: database schema migrations."""

from __future__ import annotations

from typing import Annotated

import typer

from ..audit import audit
from ..store import Store, current_revision, head_revision, safe_url, upgrade
from ._common import JSON_HELP, actor, console, load_config, print_json

app = typer.Typer(no_args_is_help=True, help="Database schema migrations.")


@app.command("upgrade")
def upgrade_cmd() -> None:
    """Migrate the database (FLEET_DB_URL, default SQLite under FLEET_HOME) to the latest schema."""
    cfg = load_config()
    before = current_revision(cfg.db_url)
    upgrade(cfg.db_url)
    head = head_revision()
    if before == head:
        console.print(f"database {safe_url(cfg.db_url)} is at {head} (up to date)")
        return
    with Store(cfg.db_url) as store, store.session() as s:
        audit(s, actor(), "db.upgrade", safe_url(cfg.db_url),
              {"from": before, "to": head})
    console.print(f"database {safe_url(cfg.db_url)} migrated from {before or 'empty'} to {head}")


@app.command("current")
def current_cmd(json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """Show the database's schema revision and the latest one this fleetctl knows."""
    cfg = load_config()
    current = current_revision(cfg.db_url)
    head = head_revision()
    if json_:
        print_json({"url": safe_url(cfg.db_url), "current": current, "head": head,
                    "up_to_date": current == head})
        return
    state = "up to date" if current == head else "needs `fleetctl db upgrade`"
    console.print(f"{safe_url(cfg.db_url)}: {current or 'empty'} (head {head}, {state})")
