"""Helpers shared by the fleetctl command modules: config, store, actor, output.

Output: ``Table`` (from ``.table``) renders plain aligned text that fits the terminal (80
columns when piped) without ever cutting a key column; ``console`` prints tables and strings
(rich-style colour tags are dropped), ``err_console.status`` shows a spinner on a terminal only.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import sqlite3
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .table import Table, console, err_console  # noqa: F401 - the commands' output

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..reads import Reader
    from ..store import BlobStore, Store

JSON_HELP = "Print JSON instead of a table."
WIDE_HELP = "Show every column in full (sha256, bytes, reasons)."


def load_config() -> ServerConfig:
    from ..config import ServerConfig  # noqa: PLC0415

    return ServerConfig.from_env()


def actor() -> str:
    """Who is acting, for the audit log: $FLEET_ACTOR, else the OS user."""
    name = os.environ.get("FLEET_ACTOR")
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def open_store(cfg: ServerConfig | None = None, *, check: bool = True) -> Store:
    """A Store for the configured database; refuses (UsageError) one that is not at head.

    The Store is also a context manager that disposes its engine on exit.
    """
    from ..store import Store, check_schema  # noqa: PLC0415

    cfg = cfg or load_config()
    if check and _sqlite_at_head(cfg.db_url) is None:
        check_schema(cfg.db_url)
    return Store(cfg.db_url)


_REVISION = re.compile(r"^revision\s*(?::[^=]*)?=\s*[\"']([^\"']+)[\"']", re.M)
_DOWN = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(.+)$", re.M)


def _migration_head() -> str | None:
    """The one head of the migration scripts, read as text (None: not exactly one)."""
    from ..reads import migrations_dir  # noqa: PLC0415

    revisions: set[str] = set()
    downs: set[str] = set()
    for path in (migrations_dir() / "versions").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        rev, down = _REVISION.search(text), _DOWN.search(text)
        if rev is None or down is None:
            return None
        revisions.add(rev.group(1))
        downs.update(re.findall(r"[\"']([^\"']+)[\"']", down.group(1)))
    heads = revisions - downs
    return heads.pop() if len(heads) == 1 else None


def _sqlite_at_head(url: str) -> Path | None:
    """The file of ``url`` when it is an SQLite file whose schema is at the migrations' head,
    found without loading SQLAlchemy or alembic (they cost a command 0.4-1 s). None means:
    ask ``check_schema``, which says what is wrong."""
    from ..reads import sqlite_path  # noqa: PLC0415

    path = sqlite_path(url)
    if path is None or not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True, timeout=5)) as conn:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return None
    return path if len(rows) == 1 and rows[0][0] == _migration_head() else None


@contextlib.contextmanager
def read_store(cfg: ServerConfig | None = None) -> Iterator[Reader]:
    """One read of the configured store for ``reads``' statements: on an SQLite file at head
    through the standard library's sqlite3 (no SQLAlchemy import: a read starts in a fraction
    of the time), else through a Store's read session (PostgreSQL; a store to be refused)."""
    from .. import reads  # noqa: PLC0415

    cfg = cfg or load_config()
    path = _sqlite_at_head(cfg.db_url)
    if path is not None:
        with reads.SqliteReader(path) as q:
            yield q
        return
    with open_store(cfg) as store, store.read() as s:
        yield reads.SessionReader(s)


def blob_store(cfg: ServerConfig) -> BlobStore:
    from ..store import BlobStore  # noqa: PLC0415

    return BlobStore(cfg.blobs_dir)


def print_json(value: Any) -> None:
    """Indented on a terminal; one compact line when piped (the C encoder: a plan of 10,000
    devices is encoded in a tenth of the time)."""
    tty = sys.stdout.isatty()
    typer.echo(json.dumps(value, indent=2 if tty else None,
                          separators=None if tty else (",", ":")))


def fmt_time(value: str | datetime | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_age(value: str | datetime | None, now: datetime | None = None) -> str:
    """How long ago, short: ``42s``, ``5m``, ``3h``, ``2d`` (``-``: never)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    seconds = max(0, int(((now or datetime.now(UTC)) - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_selector(selector: dict[str, Any]) -> str:
    """A group's selector as the operator writes it: ``arch=aarch64, hw in (jetson, xavier)``
    (``fleet.format_selector``, here without loading the store)."""
    return ", ".join(f"{k} in ({', '.join(v)})" if isinstance(v, list) else f"{k}={v}"
                     for k, v in selector.items())


def fmt_shape(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
