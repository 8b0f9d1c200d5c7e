"""The rollout engine: states and their tables (``states``), the pure decisions (``engine``)
and the SQL adapter that loads snapshots and applies decisions (``sql``, imported on its own
so the pure half stays free of SQLAlchemy)."""

from .engine import Decisions, Snapshot, on_event, step
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
