"""The two rollout state machines: a rollout's, and each device's within it (its target).

The tables below are the only statement of the legal moves; ``transition`` and
``transition_rollout`` are the only setters and refuse anything else (``IllegalTransition``).
Every other docstring that talks about these states points here. The values are the strings
stored in ``rollouts.state`` / ``rollout_targets.state`` and printed by ``fleetctl``.

Target (per device) moves::

    pending      -> notified       manifest sent (dispatch)
                 -> healthy        the device already runs the target (or says so)
                 -> skipped        no variant the device can load
                 -> cancelled      aborted / taken over (--supersede) / rolled back before it
                 -> reverting      rollback of a device that was sent a manifest before a hold
                 -> downloading | applying | trial | held    (late report on that manifest)
                 -> failed | rejected | rolled_back          (late report, or no rollback)
    notified     -> downloading | applying | trial | healthy    device reports progress
    downloading  -> applying | trial | healthy
    applying     -> trial | healthy
    trial        -> healthy
    notified | downloading | applying | trial
                 -> held           a failure (event or timeout) with attempts left
                 -> failed | rejected | rolled_back   a failure after --max-attempts
                 -> cancelled      rollout aborted / taken over by a newer rollout
                 -> reverting      rollout rolled back
    notified | downloading
                 -> pending        the blob it fetches went bad in the store (attempt given back)
    held         -> pending        the hold ran out
                 -> healthy | failed | rejected | rolled_back    (late report)
                 -> cancelled | reverting
    healthy | failed | rejected | rolled_back
                 -> reverting      rollout rolled back: the version it ran before is sent
                 -> failed         rollback impossible (no previous version / not in the catalog)
                 -> cancelled      rolled back, never got a manifest; or taken over (--supersede)
    reverting    -> reverted       healthy again on the previous version
                 -> failed         the rollback failed or timed out
                 -> cancelled      (a superseded rollout)
    skipped, cancelled, reverted   final

Re-entering the current state of a non-final target is always legal: it updates the reason
(and deadline) only, e.g. "building delta", "waiting on the device: ...", a store hold.

Rollout moves::

    running      -> paused | aborting | rolling_back | completed | superseded
    paused       -> running | aborting | rolling_back | superseded
    aborting     -> aborted | rolling_back
    aborted      -> rolling_back
    completed    -> rolling_back
    rolling_back -> rolled_back
    rolled_back, superseded   final

Operator actions (``ACTIONS``) are the subset of rollout moves ``fleetctl rollout
pause|resume|abort|rollback`` may ask for; repeating one that already happened is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from ..errors import ServerError


class TargetState(StrEnum):
    PENDING = "pending"
    NOTIFIED = "notified"
    DOWNLOADING = "downloading"
    APPLYING = "applying"
    TRIAL = "trial"
    HEALTHY = "healthy"
    HELD = "held"
    FAILED = "failed"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    REVERTING = "reverting"
    REVERTED = "reverted"


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"
    ABORTED = "aborted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    COMPLETED = "completed"
    SUPERSEDED = "superseded"


T = TargetState
R = RolloutState

_DEVICE_FAILURES = frozenset({T.FAILED, T.REJECTED, T.ROLLED_BACK})
_UPDATING = (T.NOTIFIED, T.DOWNLOADING, T.APPLYING, T.TRIAL)

TARGET_TRANSITIONS: dict[TargetState, frozenset[TargetState]] = {
    T.PENDING: frozenset({T.NOTIFIED, T.HEALTHY, T.SKIPPED, T.CANCELLED, T.REVERTING, T.HELD,
                          T.DOWNLOADING, T.APPLYING, T.TRIAL} | _DEVICE_FAILURES),
    T.NOTIFIED: frozenset({T.DOWNLOADING, T.APPLYING, T.TRIAL, T.HEALTHY, T.HELD, T.PENDING,
                           T.CANCELLED, T.REVERTING} | _DEVICE_FAILURES),
    T.DOWNLOADING: frozenset({T.APPLYING, T.TRIAL, T.HEALTHY, T.HELD, T.PENDING, T.CANCELLED,
                              T.REVERTING} | _DEVICE_FAILURES),
    T.APPLYING: frozenset({T.TRIAL, T.HEALTHY, T.HELD, T.CANCELLED, T.REVERTING}
                          | _DEVICE_FAILURES),
    T.TRIAL: frozenset({T.HEALTHY, T.HELD, T.CANCELLED, T.REVERTING} | _DEVICE_FAILURES),
    T.HELD: frozenset({T.PENDING, T.HEALTHY, T.CANCELLED, T.REVERTING} | _DEVICE_FAILURES),
    T.HEALTHY: frozenset({T.REVERTING, T.FAILED, T.CANCELLED}),
    T.FAILED: frozenset({T.REVERTING, T.CANCELLED}),
    T.REJECTED: frozenset({T.REVERTING, T.FAILED, T.CANCELLED}),
    T.ROLLED_BACK: frozenset({T.REVERTING, T.FAILED, T.CANCELLED}),
    T.REVERTING: frozenset({T.REVERTED, T.FAILED, T.CANCELLED}),
    T.SKIPPED: frozenset(),
    T.CANCELLED: frozenset(),
    T.REVERTED: frozenset(),
}

ROLLOUT_TRANSITIONS: dict[RolloutState, frozenset[RolloutState]] = {
    R.RUNNING: frozenset({R.PAUSED, R.ABORTING, R.ROLLING_BACK, R.COMPLETED, R.SUPERSEDED}),
    R.PAUSED: frozenset({R.RUNNING, R.ABORTING, R.ROLLING_BACK, R.SUPERSEDED}),
    R.ABORTING: frozenset({R.ABORTED, R.ROLLING_BACK}),
    R.ABORTED: frozenset({R.ROLLING_BACK}),
    R.COMPLETED: frozenset({R.ROLLING_BACK}),
    R.ROLLING_BACK: frozenset({R.ROLLED_BACK}),
    R.ROLLED_BACK: frozenset(),
    R.SUPERSEDED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Action:
    """An operator action: legal from ``allowed``, a no-op from ``already``."""

    allowed: frozenset[RolloutState]
    to: RolloutState
    already: frozenset[RolloutState]


ACTIONS: dict[str, Action] = {
    "pause": Action(frozenset({R.RUNNING}), R.PAUSED, frozenset({R.PAUSED})),
    "resume": Action(frozenset({R.PAUSED}), R.RUNNING, frozenset({R.RUNNING})),
    "abort": Action(frozenset({R.RUNNING, R.PAUSED}), R.ABORTING,
                    frozenset({R.ABORTING, R.ABORTED})),
    "rollback": Action(frozenset({R.RUNNING, R.PAUSED, R.COMPLETED, R.ABORTING, R.ABORTED}),
                       R.ROLLING_BACK, frozenset({R.ROLLING_BACK, R.ROLLED_BACK})),
}

# -- state sets, all derived from the vocabulary above ---------------------------------------
# Device states that count as a failure of the wave they belong to.
FAILURE_STATES = frozenset(_DEVICE_FAILURES | {T.HELD})
SUCCESS_STATES = frozenset({T.HEALTHY})
# States no further device event can change (for this rollout).
TERMINAL_STATES = frozenset(_DEVICE_FAILURES | {T.HEALTHY, T.SKIPPED, T.CANCELLED, T.REVERTED})
# States that are a verdict on the device for its wave (held: failed, retried later).
VERDICT_STATES = frozenset(TERMINAL_STATES | {T.HELD})
# A manifest is out and not yet answered for good: re-sent on hello / takeover, deadlines run.
IN_FLIGHT_STATES = (*_UPDATING, T.REVERTING)
# How far an update got: a device's report only ever moves its target forward.
PROGRESS_ORDER = {T.PENDING: 0, T.NOTIFIED: 1, T.DOWNLOADING: 2, T.APPLYING: 3, T.TRIAL: 4}
# Rollouts the controller works every tick.
ACTIVE_ROLLOUT_STATES = (R.RUNNING, R.PAUSED, R.ABORTING, R.ROLLING_BACK)
# A newer rollout of the same model supersedes these.
SUPERSEDABLE_STATES = (R.RUNNING, R.PAUSED)
# Rollouts that are over (a rollback may still be asked of completed / aborted ones).
FINAL_ROLLOUT_STATES = frozenset({R.COMPLETED, R.ABORTED, R.ROLLED_BACK, R.SUPERSEDED})
# Rollout states that end a `--wait` (paused needs an operator).
WAIT_ENDS = FINAL_ROLLOUT_STATES | {R.PAUSED}


class IllegalTransition(ServerError):
    """A move the transition table does not allow: a server bug, refused before it is stored."""


class _Target(Protocol):
    state: str
    reason: str
    updated_at: datetime
    state_deadline: datetime | None


class _Rollout(Protocol):
    state: str
    state_reason: str
    updated_at: datetime


def can_move(current: str, to: str) -> bool:
    """True when a target may go from ``current`` to ``to`` (the table, or a re-entry)."""
    now_state, to_state = TargetState(current), TargetState(to)
    nxt = TARGET_TRANSITIONS[now_state]
    return to_state in nxt or (to_state == now_state and bool(nxt))


def check_move(current: str, to: str) -> TargetState:
    """``to`` as a TargetState, or IllegalTransition."""
    try:
        if can_move(current, to):
            return TargetState(to)
    except ValueError as e:
        raise IllegalTransition(f"unknown target state in {current!r} -> {to!r}") from e
    raise IllegalTransition(f"a target cannot go from {current} to {to}")


def check_rollout_move(current: str, to: str) -> RolloutState:
    try:
        now_state, to_state = RolloutState(current), RolloutState(to)
    except ValueError as e:
        raise IllegalTransition(f"unknown rollout state in {current!r} -> {to!r}") from e
    if to_state not in ROLLOUT_TRANSITIONS[now_state]:
        raise IllegalTransition(f"a rollout cannot go from {current} to {to}")
    return to_state


def transition(target: _Target, to: str, reason: str, now: datetime, *,
               timeout_s: int | None = None) -> None:
    """The one setter of a target's state: checks the table, then sets state, reason,
    updated_at and the state's deadline (``timeout_s`` from now; none when 0/None)."""
    target.state = check_move(target.state, to).value
    target.reason, target.updated_at = reason, now
    target.state_deadline = now + timedelta(seconds=timeout_s) if timeout_s else None


def transition_rollout(rollout: _Rollout, to: str, reason: str, now: datetime) -> None:
    """The one setter of a rollout's state: checks the table, then sets state, reason and
    updated_at."""
    rollout.state = check_rollout_move(rollout.state, to).value
    rollout.state_reason, rollout.updated_at = reason, now
