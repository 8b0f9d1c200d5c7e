"""Rollout service functions (DB only, no MQTT): create, read, render. Used by the CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import registry
from .errors import NotFoundError, UsageError
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

FINAL_ROLLOUT_STATES = frozenset({"completed", "failed", "aborted"})


def create_rollout(s: Session, spec: str, group_name: str, actor: str, *,
                   allow_empty: bool = False) -> Rollout:
    """Record a rollout of version ``spec`` to ``group_name``; the server process does the rest."""
    version = registry.resolve_version(s, spec)
    group = s.scalar(select(Group).where(Group.name == group_name))
    if group is None:
        raise NotFoundError(f"unknown group {group_name!r} (see `fleetctl group list`)")
    if not s.scalar(select(func.count()).select_from(Variant).where(Variant.version_id == version.id)):
        raise UsageError(f"version {spec} has no variants")
    devices = registry.devices_in_group(s, group_name)
    if not devices and not allow_empty:
        raise UsageError(f"group {group_name!r} matches no device yet (use --allow-empty to "
                         "roll out to devices that join later)")
    now = datetime.now(UTC)
    r = Rollout(model_id=version.model_id, version_id=version.id, group_id=group.id,
                state="running", created_by=actor, created_at=now, updated_at=now)
    s.add(r)
    s.flush()
    for d in devices:
        s.add(RolloutTarget(rollout_id=r.id, device_id=d.id, state="pending", reason="",
                            updated_at=now))
    model = s.get(Model, version.model_id)
    registry.audit(s, actor, "rollout.create", f"rollout/{r.id}",
                   {"model": model.name if model else None, "version": version.version,
                    "group": group_name, "devices": len(devices)})
    return r


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
            "device": t.device_id, "state": t.state, "reason": t.reason, "variant": variant,
            "artifact": t.artifact_kind, "bytes_sent": t.bytes_to_send,
            "full_bytes": t.full_bytes, "target_sha256": t.target_sha256,
            "running_sha256": running_sha,
            "updated_at": t.updated_at.isoformat() if t.updated_at else None,
        })
    out: dict[str, Any] = {
        "id": r.id, "model": model.name if model else None,
        "version": version.version if version else None, "group": group.name if group else None,
        "state": r.state, "created_by": r.created_by,
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
