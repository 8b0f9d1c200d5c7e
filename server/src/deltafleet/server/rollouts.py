"""Rollout service functions (DB only, no MQTT): create, act on, plan, read, render. Used by
the CLI. States and the operator actions are the tables of ``rollout.states``; a plan is
``planner.plan_target``, the same call dispatch makes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import catalog, fleet
from .audit import audit
from .errors import NotFoundError, UsageError
from .planner import BlobProblem, PlanKind, all_intact, plan_target
from .policy import RolloutPolicy, assign_waves
from .rollout.sql import load_deltas, running_models
from .rollout.states import (
    ACTIONS,
    FAILURE_STATES,
    FINAL_ROLLOUT_STATES,
    SUPERSEDABLE_STATES,
    TERMINAL_STATES,
    WAIT_ENDS,
    RolloutState,
    TargetState,
    transition,
    transition_rollout,
)
from .store.models import (
    DeviceModel,
    Group,
    Model,
    ModelVersion,
    Rollout,
    RolloutTarget,
    Variant,
)

__all__ = ["FINAL_ROLLOUT_STATES", "WAIT_ENDS", "act_on_rollout", "create_rollout", "get_rollout",
           "list_rollouts", "plan_rollout", "rollout_json"]


def create_rollout(s: Session, spec: str, group_name: str, actor: str, *,
                   policy: RolloutPolicy | None = None, allow_empty: bool = False) -> Rollout:
    """Record a rollout of version ``spec`` to ``group_name``; the server process does the rest.

    A running or paused rollout of the same model is superseded: desired state is one version
    per model, and the newest rollout decides it."""
    policy = policy or RolloutPolicy()
    version = catalog.resolve_version(s, spec)
    group = s.scalar(select(Group).where(Group.name == group_name))
    if group is None:
        raise NotFoundError(f"unknown group {group_name!r} (see `fleetctl group list`)")
    if not s.scalar(select(func.count()).select_from(Variant)
                    .where(Variant.version_id == version.id)):
        raise UsageError(f"version {spec} has no variants")
    devices = fleet.devices_in_group(s, group_name)
    if not devices and not allow_empty:
        raise UsageError(f"group {group_name!r} matches no device yet (use --allow-empty to "
                         "roll out to devices that join later)")
    now = datetime.now(UTC)
    for old in s.scalars(select(Rollout).where(
            Rollout.model_id == version.model_id,
            Rollout.state.in_(SUPERSEDABLE_STATES))).all():
        transition_rollout(old, RolloutState.SUPERSEDED, "a newer rollout of this model started",
                           now)
        old.finished_at = now
        for t in s.scalars(select(RolloutTarget).where(
                RolloutTarget.rollout_id == old.id,
                RolloutTarget.state.not_in(TERMINAL_STATES))).all():
            transition(t, TargetState.CANCELLED, "superseded by a newer rollout", now)
        audit(s, actor, "rollout.supersede", f"rollout/{old.id}", {})
    r = Rollout(model_id=version.model_id, version_id=version.id, group_id=group.id,
                state=RolloutState.RUNNING.value, state_reason="", policy=policy.to_json(), current_wave=0,
                failures_acknowledged=0, created_by=actor, created_at=now, updated_at=now)
    s.add(r)
    s.flush()
    waves = assign_waves([d.id for d in devices], policy)
    for d in devices:
        s.add(RolloutTarget(rollout_id=r.id, device_id=d.id, state=TargetState.PENDING.value,
                            reason="",
                            wave=waves[d.id], attempts=0, health={}, updated_at=now))
    model = s.get(Model, version.model_id)
    audit(s, actor, "rollout.create", f"rollout/{r.id}",
          {"model": model.name if model else None, "version": version.version,
           "group": group_name, "devices": len(devices), "policy": policy.to_json()})
    return r


def act_on_rollout(s: Session, rollout_id: int, action: str, actor: str) -> tuple[Rollout, bool]:
    """Apply an operator action (``states.ACTIONS``); returns (rollout, changed). Idempotent
    and audited."""
    r = get_rollout(s, rollout_id)
    act = ACTIONS[action]
    changed = False
    if r.state in act.already:
        pass
    elif r.state not in act.allowed:
        raise UsageError(f"rollout {rollout_id} is {r.state}; cannot {action} it")
    else:
        now = datetime.now(UTC)
        if action == "resume":
            failures = s.scalar(select(func.count()).select_from(RolloutTarget).where(
                RolloutTarget.rollout_id == r.id, RolloutTarget.state.in_(FAILURE_STATES)))
            r.failures_acknowledged = int(failures or 0)
        transition_rollout(r, act.to, f"{action} by {actor}", now)
        if act.to == RolloutState.ROLLING_BACK:
            r.finished_at = None
        changed = True
    audit(s, actor, f"rollout.{action}", f"rollout/{r.id}",
          {"changed": changed, "state": r.state})
    return r, changed


def plan_rollout(s: Session, spec: str, group_name: str, *,
                 blob_problem: BlobProblem = all_intact,
                 failed_deltas: dict[tuple[str, str], str] | None = None,
                 prefer: str | None = None) -> dict[str, Any]:
    """What a rollout would do, per device, before anything is sent: ``planner.plan_target``
    as dispatch calls it, given what the server's store holds (``blob_problem``) and the pairs
    no delta could be built for. ``bytes`` is what the device would be sent (a full artifact:
    the compressed model when the catalog has one and its blob is intact; for "delta?", a
    delta not built yet, the full artifact as the upper bound); ``full_bytes`` is the model
    file's size."""
    version = catalog.resolve_version(s, spec)
    model = s.get(Model, version.model_id)
    assert model is not None
    options = catalog.variant_options(s, version.id)
    deltas = load_deltas(s, [o.sha256 for o in options])
    devices = fleet.devices_in_group(s, group_name)
    running = running_models(s, model.name, [d.id for d in devices])
    selecting = select_for(s, version.id, options, devices, prefer) if prefer else {}
    choices, by_type = type_plans(selecting, options) if selecting else ({}, [])
    selecting = {i: replace(x, chosen=choices[i]) for i, x in selecting.items()}
    rows = []
    total = full = 0
    for d in devices:
        now_runs = running.get(d.id)
        plan = plan_target(d.runtimes or {}, now_runs, options, deltas=deltas,
                           failed_deltas=failed_deltas or {}, blob_problem=blob_problem,
                           selecting=selecting.get(d.id))
        row: dict[str, Any] = {"device": d.id, "online": d.online,
                               "runs": now_runs.version if now_runs else None,
                               "base_sha256": now_runs.sha256 if now_runs else None}
        v = plan.variant
        if v is None:
            row.update(can_take=False, reason=plan.reason)
            rows.append(row)
            continue
        row.update(can_take=True, variant=v.name, format=v.format, precision=v.precision,
                   full_bytes=v.size_bytes, target_sha256=v.sha256, artifact=str(plan.kind),
                   bytes=plan.bytes, reason=plan.reason)
        if d.id in choices:
            row["selection"] = choices[d.id].reason
        if plan.codec is not None:
            row["codec"] = plan.codec
        total += plan.bytes
        full += v.size_bytes if plan.kind != PlanKind.NONE else 0
        rows.append(row)
    out = {"model": model.name, "version": version.version, "group": group_name,
           "devices": rows, "bytes": total, "full_bytes": full,
           "cannot_take": sum(1 for r in rows if not r["can_take"])}
    if selecting:
        out["prefer"] = prefer
        out["device_types"] = by_type
    return out


def select_for(s: Session, version_id: int, options: list, devices: list,
               prefer: str) -> dict[str, Any]:
    """Per device id the planner's ``Selecting`` (``--prefer``; docs/portraits.md)."""
    from .fleet.portraits import selection_inputs  # noqa: PLC0415
    from .planner import Selecting  # noqa: PLC0415
    from .selection import Objective, variant_facts  # noqa: PLC0415

    try:
        objective = Objective(prefer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    infos: dict[int, Any] = dict(s.execute(select(Variant.id, Variant.info)
                           .where(Variant.version_id == version_id)).all())
    facts = {o.variant_id: variant_facts(o, infos.get(o.variant_id)) for o in options}
    device_facts, own, base = selection_inputs(s, devices)
    return {d.id: Selecting(device_facts[d.id], facts, objective, own.get(d.id), base)
            for d in devices}


def type_plans(selecting: dict[str, Any], options: list) -> tuple[dict[str, Any],
                                                                  list[dict[str, Any]]]:
    """``rollout plan --prefer``: the choice per device id, and per device type the variant,
    its figures and why."""
    from .selection import plan_fleet  # noqa: PLC0415

    any_sel = next(iter(selecting.values()))
    facts = [any_sel.facts[o.variant_id] for o in options]
    choices, plans = plan_fleet([x.device for x in selecting.values()], facts,
                                any_sel.objective,
                                {i: x.benchmarks for i, x in selecting.items() if x.benchmarks},
                                any_sel.baselines)
    return choices, [{"device_type": p.device_type, "variant": p.variant, "devices": p.devices,
             "variants": p.variants, "figures": p.figures, "reason": p.reason,
             "incompatible": list(p.incompatible)}
            for p in plans]


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
