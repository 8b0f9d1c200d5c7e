"""The rollout engine: states and their tables (``states``), the pure decisions (``engine``)
and the SQL adapter that loads snapshots and applies decisions (``sql``, imported on its own
so the pure half stays free of SQLAlchemy). The engine is imported on first use: the
states alone are what the store's models and every fleetctl read need."""

from typing import TYPE_CHECKING, Any

from .states import (
    ACTIONS,
    ROLLOUT_TRANSITIONS,
    TARGET_TRANSITIONS,
    IllegalTransition,
    RolloutState,
    TargetState,
    transition,
    transition_rollout,
)

if TYPE_CHECKING:
    from .engine import Decisions, Snapshot, on_event, step


def __getattr__(name: str) -> Any:
    if name in {"Decisions", "Snapshot", "on_event", "step"}:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACTIONS",
    "ROLLOUT_TRANSITIONS",
    "TARGET_TRANSITIONS",
    "Decisions",
    "IllegalTransition",
    "RolloutState",
    "Snapshot",
    "TargetState",
    "on_event",
    "step",
    "transition",
    "transition_rollout",
]
