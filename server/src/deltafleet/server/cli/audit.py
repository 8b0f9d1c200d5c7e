"""`fleetctl audit`: who changed what, when."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from ..errors import UsageError
from . import remote
from ._common import JSON_HELP, WIDE_HELP, console, fmt_time, open_store, print_json
from .table import Table

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``24h``, ``7d``, ``2w`` (ago) or an ISO 8601 time (naive = UTC)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    m = _RELATIVE.match(text)
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"invalid --since {text!r}: use an ISO 8601 time or a duration like 30m, 24h, 7d"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def audit(
    since: Annotated[
        str | None,
        typer.Option(help="Only entries since this ISO 8601 time or duration ago (30m, 24h, 7d)."),
    ] = None,
    wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
    json_: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Show the audit log (oldest first): every change made through fleetctl."""
    if remote.active():
        rows = remote.client().get_all("/audit", {"since": since})
    else:
        rows = _load(parse_since(since) if since else None)
    if json_:
        print_json(rows)
        return
    table = Table("at (UTC)", "actor", "action", wide=wide)
    table.add_column("subject", overflow="fold")
    table.add_column("details")
    for e in rows:
        table.add_row(fmt_time(e["at"]), e["actor"], e["action"], e["subject"],
                      json.dumps(e["details"], sort_keys=True))
    console.print(table if rows else "no audit entries")


def _load(start: datetime | None) -> list[dict[str, Any]]:
    from .. import views  # noqa: PLC0415
    from ..audit import list_audit  # noqa: PLC0415

    with open_store() as store, store.read() as s:
        return [views.audit_to_json(e) for e in list_audit(s, start)]
