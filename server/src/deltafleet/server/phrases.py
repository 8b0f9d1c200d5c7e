"""How status lines and reasons word times and sizes: one wording for the rollout engine, the
planner and every operator read (no imports beyond the standard library)."""

from __future__ import annotations

from datetime import datetime

__all__ = ["clock", "size_text"]


def clock(at: datetime | None) -> str:
    """A time as status lines print it (UTC, to the second)."""
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at is not None else "an unknown time"


def size_text(n: int) -> str:
    """Bytes as an operator reads them (binary units, as ``fleetctl`` prints sizes)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
