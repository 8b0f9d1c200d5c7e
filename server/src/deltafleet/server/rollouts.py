"""Rollout service functions (DB only, no MQTT): create, read, render. Used by the CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import registry
from .errors import NotFoundError, UsageError
from .planner import choose_variant, delta_worth_it
from .policy import TERMINAL_STATES, RolloutPolicy, assign_waves
from .store.models import (
    Device,
    DeviceModel,
    Group,
    Model,
    ModelVersion,
    Rollout,
    RolloutTarget,
    Variant,
)

FINAL_ROLLOUT_STATES = frozenset({"completed", "aborted", "rolled_back", "superseded"})
# Rollout states that end a `--wait` (paused needs an operator).
WAIT_ENDS = FINAL_ROLLOUT_STATES | {"paused"}


def create_rollout(s: Session, spec: str, group_name: str, actor: str, *,
                   policy: RolloutPolicy | None = None, allow_empty: bool = False) -> Rollout:
    """Record a rollout of version ``spec`` to ``group_name``; the server process does the rest.

    A running or paused rollout of the same model is superseded: desired state is one version
    per model, and the newest rollout decides it."""
    policy = policy or RolloutPolicy()
    version = registry.resolve_version(s, spec)
    group = s.scalar(select(Group).where(Group.name == group_name))
    if group is None:
        raise NotFoundError(f"unknown group {group_name!r} (see `fleetctl group list`)")
    if not s.scalar(select(func.count()).select_from(Variant)
                    .where(Variant.version_id == version.id)):
        raise UsageError(f"version {spec} has no variants")
    devices = registry.devices_in_group(s, group_name)
    if not devices and not allow_empty:
        raise UsageError(f"group {group_name!r} matches no device yet (use --allow-empty to "
                         "roll out to devices that join later)")
    now = datetime.now(UTC)
    for old in s.scalars(select(Rollout).where(
            Rollout.model_id == version.model_id,
            Rollout.state.in_(("running", "paused")))).all():
        old.state, old.updated_at, old.finished_at = "superseded", now, now
        old.state_reason = "a newer rollout of this model started"
        for t in s.scalars(select(RolloutTarget).where(
                RolloutTarget.rollout_id == old.id,
                RolloutTarget.state.not_in(TERMINAL_STATES))).all():
            t.state, t.reason, t.updated_at = "cancelled", "superseded by a newer rollout", now
        registry.audit(s, actor, "rollout.supersede", f"rollout/{old.id}", {})
    r = Rollout(model_id=version.model_id, version_id=version.id, group_id=group.id,
                state="running", state_reason="", policy=policy.to_json(), current_wave=0,
                failures_acknowledged=0, created_by=actor, created_at=now, updated_at=now)
    s.add(r)
    s.flush()
    waves = assign_waves([d.id for d in devices], policy)
    for d in devices:
        s.add(RolloutTarget(rollout_id=r.id, device_id=d.id, state="pending", reason="",
                            wave=waves[d.id], attempts=0, health={}, updated_at=now))
    model = s.get(Model, version.model_id)
    registry.audit(s, actor, "rollout.create", f"rollout/{r.id}",
                   {"model": model.name if model else None, "version": version.version,
                    "group": group_name, "devices": len(devices), "policy": policy.to_json()})
    return r


# Operator actions: (allowed from states, new state). Repeating an action is a no-op.
ACTIONS = {
    "pause": ({"running"}, "paused"),
    "resume": ({"paused"}, "running"),
    "abort": ({"running", "paused"}, "aborting"),
    "rollback": ({"running", "paused", "completed", "aborting", "aborted"}, "rolling_back"),
}
ALREADY = {"pause": {"paused"}, "resume": {"running"}, "abort": {"aborting", "aborted"},
           "rollback": {"rolling_back", "rolled_back"}}


def act_on_rollout(s: Session, rollout_id: int, action: str, actor: str) -> tuple[Rollout, bool]:
    """Apply an operator action; returns (rollout, changed). Idempotent and audited."""
    r = get_rollout(s, rollout_id)
    allowed, new_state = ACTIONS[action]
    changed = False
    if r.state in ALREADY[action]:
        pass
    elif r.state not in allowed:
        raise UsageError(f"rollout {rollout_id} is {r.state}; cannot {action} it")
    else:
        now = datetime.now(UTC)
        if action == "resume":
            failures = s.scalar(select(func.count()).select_from(RolloutTarget).where(
                RolloutTarget.rollout_id == r.id,
                RolloutTarget.state.in_(("failed", "rejected", "rolled_back", "held"))))
            r.failures_acknowledged = int(failures or 0)
        r.state, r.updated_at = new_state, now
        r.state_reason = f"{action} by {actor}"
        if new_state == "rolling_back":
            r.finished_at = None
        changed = True
    registry.audit(s, actor, f"rollout.{action}", f"rollout/{r.id}",
                   {"changed": changed, "state": r.state})
    return r, changed


def plan_rollout(s: Session, spec: str, group_name: str) -> dict[str, Any]:
    """What a rollout would do, per device, before anything is sent. ``bytes`` is what the
    device would be sent (a full artifact: the compressed model when the catalog has one);
    ``full_bytes`` is the model file's size."""
    version = registry.resolve_version(s, spec)
    model = s.get(Model, version.model_id)
    assert model is not None
    options = registry.variant_options(s, version.id)
    rows = []
    total = full = 0
    for d in registry.devices_in_group(s, group_name):
        running = s.get(DeviceModel, (d.id, model.name))
        choice = choose_variant(d.runtimes or {}, running.variant if running else None, options)
        row: dict[str, Any] = {"device": d.id, "online": d.online,
                               "runs": running.version if running else None,
                               "base_sha256": running.sha256 if running else None}
        if choice.variant is None:
            row.update(can_take=False, reason=choice.reason)
            rows.append(row)
            continue
        v = choice.variant
        full_artifact = v.full
        row.update(can_take=True, variant=v.name, format=v.format, precision=v.precision,
                   full_bytes=v.size_bytes, target_sha256=v.sha256)
        full_row = {"artifact": "full", "bytes": full_artifact.size_bytes,
                    "codec": full_artifact.codec}
        if running is not None and running.sha256 == v.sha256:
            row.update(artifact="none", bytes=0, reason="already runs the target")
        elif running is None:
            row.update(full_row, reason="runs no version of the model")
        else:
            delta = registry.best_delta(s, running.sha256, v.sha256)
            if delta is None:
                row.update(artifact="delta?", bytes=full_artifact.size_bytes,
                           reason="delta not built yet (the server builds it; the full "
                                  "artifact's size shown as the upper bound)")
            elif delta_worth_it(delta.size_bytes, full_artifact.size_bytes):
                row.update(artifact="delta", bytes=delta.size_bytes, codec=delta.codec, reason="")
            else:
                row.update(full_row, reason="delta not at least 10% smaller than the full "
                                            "artifact")
        total += row["bytes"]
        full += v.size_bytes if row["artifact"] != "none" else 0
        rows.append(row)
    return {"model": model.name, "version": version.version, "group": group_name,
            "devices": rows, "bytes": total, "full_bytes": full,
            "cannot_take": sum(1 for r in rows if not r["can_take"])}


def get_rollout(s: Session, rollout_id: int) -> Rollout:
    r = s.get(Rollout, rollout_id)
    if r is None:
        raise NotFoundError(f"unknown rollout {rollout_id} (see `fleetctl rollout list`)")
    return r


def rollout_json(s: Session, r: Rollout, *, with_targets: bool = True) -> dict[str, Any]:
    model = s.get(Model, r.model_id)
    version = s.get(ModelVersion, r.version_id)
    group = s.get(Group, r.group_id)
    rows = s.execute(
        select(RolloutTarget, Variant.name, DeviceModel.sha256)
        .outerjoin(Variant, Variant.id == RolloutTarget.variant_id)
        .outerjoin(DeviceModel, (DeviceModel.device_id == RolloutTarget.device_id)
                   & (DeviceModel.model_name == (model.name if model else "")))
        .where(RolloutTarget.rollout_id == r.id)
        .order_by(RolloutTarget.device_id)
    ).all()
    counts: dict[str, int] = {}
    targets = []
    sent = full = 0
    for t, variant, running_sha in rows:
        counts[t.state] = counts.get(t.state, 0) + 1
        if t.bytes_to_send is not None:
            sent += t.bytes_to_send
            full += t.full_bytes or 0
        targets.append({
            "device": t.device_id, "wave": t.wave, "attempts": t.attempts,
            "state": t.state, "reason": t.reason, "variant": variant,
            "artifact": t.artifact_kind, "bytes_sent": t.bytes_to_send,
            "full_bytes": t.full_bytes, "target_sha256": t.target_sha256,
            "running_sha256": running_sha, "previous_version": t.previous_version,
            "health": t.health,
            "updated_at": t.updated_at.isoformat() if t.updated_at else None,
        })
    out: dict[str, Any] = {
        "id": r.id, "model": model.name if model else None,
        "version": version.version if version else None, "group": group.name if group else None,
        "state": r.state, "state_reason": r.state_reason, "current_wave": r.current_wave,
        "policy": r.policy, "created_by": r.created_by,
        "created_at": r.created_at.isoformat() if r.created_at else None,
        "finished_at": r.finished_at.isoformat() if r.finished_at else None,
        "counts": counts, "bytes_sent": sent, "full_bytes": full,
    }
    if with_targets:
        out["targets"] = targets
    return out


def list_rollouts(s: Session) -> list[Rollout]:
    return list(s.scalars(select(Rollout).order_by(Rollout.id.desc())).all())


def device_count(s: Session) -> int:
    return int(s.scalar(select(func.count()).select_from(Device)) or 0)
