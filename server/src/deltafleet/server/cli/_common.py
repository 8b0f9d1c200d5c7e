"""Helpers shared by the fleetctl command modules: config, store, actor, output."""

from __future__ import annotations

import getpass
import json
import os
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console

from ..config import ServerConfig
from ..store import BlobStore, Store, check_schema

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

JSON_HELP = "Print JSON instead of a table."


def load_config() -> ServerConfig:
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
    cfg = cfg or load_config()
    if check:
        check_schema(cfg.db_url)
    return Store(cfg.db_url)


def blob_store(cfg: ServerConfig) -> BlobStore:
    return BlobStore(cfg.blobs_dir)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def fmt_time(value: str | datetime | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_shape(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
