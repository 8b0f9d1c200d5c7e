"""Rollout service functions (DB only, no MQTT): create, act on, plan, read, render. Used by
the CLI. States and the operator actions are the tables of ``rollout.states``; a plan is
``planner.plan_target``, the same call dispatch makes.

One active rollout works a device per model. A new rollout whose group covers devices an
active rollout of the same model still covers is refused (``Overlap``) unless the operator
asks to supersede it; then only those devices move to the new rollout (their old targets are
cancelled, "taken over by rollout N") and the old rollout keeps working the rest, or ends as
superseded when nothing is left to it. A rollback in progress is never taken over."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import catalog, fleet, reads
from .audit import audit
from .errors import NotFoundError, UsageError
from .planner import (
    BlobProblem,
    PlanKind,
    Selecting,
    all_intact,
    choose_variant,
    plan_target,
    select_choice,
)
from .policy import RolloutPolicy, assign_waves
from .rollout.load import load_deltas, running_models
from .rollout.states import (
    ACTIONS,
    FAILURE_STATES,
    FINAL_ROLLOUT_STATES,
    IN_FLIGHT_STATES,
    SUPERSEDABLE_STATES,
    WAIT_ENDS,
    RolloutState,
    TargetState,
    transition,
    transition_rollout,
)
from .store.models import (
    Device,
    Group,
    Model,
    ModelVersion,
    Rollout,
    RolloutEvent,
    RolloutTarget,
    Variant,
)

__all__ = ["FINAL_ROLLOUT_STATES", "WAIT_ENDS", "Overlap", "Started", "act_on_rollout",
           "create_rollout", "device_selection", "get_rollout", "list_rollouts", "plan_rollout",
           "rollout_events",
           "rollout_json", "start_rollout"]

# Targets an old rollout still covers (a takeover moves them): all but those it let go.
_LET_GO = (TargetState.CANCELLED.value, TargetState.SKIPPED.value, TargetState.REVERTED.value)
# Rollouts that cover their devices (an aborting one is letting go of all of them).
_COVERING = (RolloutState.RUNNING.value, RolloutState.PAUSED.value,
             RolloutState.ROLLING_BACK.value)


@dataclass(frozen=True, slots=True)
class Overlap:
    """An active rollout of the same model that covers ``devices`` of the new group."""

    rollout_id: int
    version: str
    state: str
    devices: tuple[str, ...]
    others: int  # devices it covers outside the new group (left to it)

    def refusal(self) -> str:
        n = len(self.devices)
        return (f"rollout {self.rollout_id} ({self.version}, {self.state}) already covers {n} "
                f"of these devices; add --supersede to move {'it' if n == 1 else 'them'} to "
                "the new rollout")

    def summary(self) -> str:
        left = (f"; its {self.others} other device(s) stay in rollout {self.rollout_id}"
                if self.others else f"; rollout {self.rollout_id} is superseded")
        return f"took over {len(self.devices)} device(s) from rollout {self.rollout_id}{left}"

    def to_json(self) -> dict[str, Any]:
        return {"rollout": self.rollout_id, "devices": len(self.devices), "left": self.others,
                "summary": self.summary()}


@dataclass(frozen=True, slots=True)
class Started:
    rollout: Rollout
    took_over: tuple[Overlap, ...] = ()
    incompatible: int = 0  # devices of the group no variant fits: skipped, never notified

    def incompatible_line(self) -> str:
        """One line for `rollout model` (empty when every device can take the version)."""
        n = self.incompatible
        if not n:
            return ""
        return (f"{n} device(s) incompatible (no variant fits): skipped, never notified; see "
                f"`fleetctl rollout status {self.rollout.id}` for why")


def overlaps(s: Session, model_id: int, device_ids: list[str]) -> list[Overlap]:
    """The active rollouts of the model that cover some of ``device_ids`` (a target not let
    go), oldest first."""
    wanted = set(device_ids)
    inside: dict[int, list[str]] = {}
    outside: dict[int, int] = {}
    about: dict[int, tuple[str, str]] = {}
    for rid, state, version, device_id in s.execute(
            select(Rollout.id, Rollout.state, ModelVersion.version, RolloutTarget.device_id)
            .join(RolloutTarget, RolloutTarget.rollout_id == Rollout.id)
            .join(ModelVersion, ModelVersion.id == Rollout.version_id)
            .where(Rollout.model_id == model_id, Rollout.state.in_(_COVERING),
                   RolloutTarget.state.not_in(_LET_GO))
            .order_by(Rollout.id, RolloutTarget.device_id)).all():
        about[rid] = (version, state)
        if device_id in wanted:
            inside.setdefault(rid, []).append(device_id)
        else:
            outside[rid] = outside.get(rid, 0) + 1
    return [Overlap(rid, *about[rid], tuple(ids), outside.get(rid, 0))
            for rid, ids in inside.items()]


def _take_over(s: Session, old: Overlap, new_id: int, actor: str, now: datetime) -> None:
    """Move ``old.devices`` out of rollout ``old.rollout_id`` (cancelled: taken over); the old
    rollout ends as superseded when it covers nothing else."""
    # locked: the server may be moving these rows in this instant (its tick commits first)
    r = s.get(Rollout, old.rollout_id, with_for_update=True)
    assert r is not None
    moved = set(old.devices)
    for t in s.scalars(select(RolloutTarget).where(
            RolloutTarget.rollout_id == r.id, RolloutTarget.device_id.in_(moved),
            RolloutTarget.state.not_in(_LET_GO)).with_for_update()).all():
        was = ""
        if t.state in IN_FLIGHT_STATES:
            was = f" (it was {t.state}; it may finish that update first)"
        elif t.state != TargetState.PENDING:
            was = f" (it was {t.state})"
        transition(t, TargetState.CANCELLED, f"taken over by rollout {new_id}{was}", now)
    if not old.others and r.state in SUPERSEDABLE_STATES:
        transition_rollout(r, RolloutState.SUPERSEDED,
                           f"rollout {new_id} took over its {len(moved)} device(s)", now)
        r.finished_at = now
    audit(s, actor, "rollout.supersede", f"rollout/{r.id}",
          {"by": new_id, "devices": len(moved), "left": old.others})


def create_rollout(s: Session, spec: str, group_name: str, actor: str, *,
                   policy: RolloutPolicy | None = None, allow_empty: bool = False,
                   supersede: bool = False) -> Rollout:
    """``start_rollout``, returning the rollout."""
    return start_rollout(s, spec, group_name, actor, policy=policy, allow_empty=allow_empty,
                         supersede=supersede).rollout


def start_rollout(s: Session, spec: str, group_name: str, actor: str, *,
                  policy: RolloutPolicy | None = None, allow_empty: bool = False,
                  supersede: bool = False) -> Started:
    """Record a rollout of version ``spec`` to ``group_name``; the server process does the rest.

    Refused (UsageError) when an active rollout of the same model covers some of the group's
    devices, unless ``supersede``: then those devices (only those) move to the new rollout.
    With ``policy.variant`` (``--variant``) every device of the group must be able to load
    that variant, else the rollout is refused naming the ones that cannot."""
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
    if policy.variant is not None:
        _check_pin(s, version, policy.variant, devices, group_name, spec)
    found = overlaps(s, version.model_id, [d.id for d in devices])
    for o in found:
        if o.state not in SUPERSEDABLE_STATES:
            raise UsageError(f"rollout {o.rollout_id} is {o.state} on {len(o.devices)} of these "
                             f"devices; wait until it ends (`fleetctl rollout status "
                             f"{o.rollout_id}`)")
        if not supersede:
            raise UsageError(o.refusal())
    now = datetime.now(UTC)
    r = Rollout(model_id=version.model_id, version_id=version.id, group_id=group.id,
                state=RolloutState.RUNNING.value, state_reason="", policy=policy.to_json(), current_wave=0,
                failures_acknowledged=0, created_by=actor, created_at=now, updated_at=now)
    s.add(r)
    s.flush()
    for o in found:
        _take_over(s, o, r.id, actor, now)
    waves = assign_waves([d.id for d in devices], policy)
    unfit = incompatible(s, version, devices, policy)
    for d in devices:
        why = unfit.get(d.id)
        s.add(RolloutTarget(rollout_id=r.id, device_id=d.id,
                            state=(TargetState.SKIPPED if why else TargetState.PENDING).value,
                            reason=f"incompatible: {why}" if why else "",
                            wave=waves[d.id], attempts=0, health={}, updated_at=now))
    model = s.get(Model, version.model_id)
    audit(s, actor, "rollout.create", f"rollout/{r.id}",
          {"model": model.name if model else None, "version": version.version,
           "group": group_name, "devices": len(devices), "policy": policy.to_json(),
           "took_over": {str(o.rollout_id): len(o.devices) for o in found},
           "incompatible": len(unfit)})
    return Started(r, tuple(found), len(unfit))


def incompatible(s: Session, version: ModelVersion, devices: list[Device],
                 policy: RolloutPolicy) -> dict[str, str]:
    """Device id -> why no variant of ``version`` fits it, by the rollout's rule: the pin,
    else selection (``--prefer``: constraints on portraits and figures), else format. These
    targets start skipped: they are never notified."""
    if not devices:
        return {}
    options = catalog.variant_options(s, version.id)
    running = running_models(s, _model_name(s, version), [d.id for d in devices])
    selecting = (select_for(s, version.id, options, devices, policy.prefer)
                 if policy.prefer and policy.variant is None else {})
    out = {}
    for d in devices:
        now_runs = running.get(d.id)
        choice = (select_choice(selecting[d.id], options) if d.id in selecting else
                  choose_variant(dict(d.runtimes or {}), now_runs.variant if now_runs else None,
                                 options, policy.variant))
        if choice.variant is None:
            out[d.id] = choice.reason
    return out


def _check_pin(s: Session, version: ModelVersion, variant: str, devices: list[Device],
               group_name: str, spec: str) -> None:
    """A pinned variant must exist and load on every device of the group."""
    options = catalog.variant_options(s, version.id)
    if variant not in {o.name for o in options}:
        names = ", ".join(sorted(o.name for o in options))
        raise UsageError(f"version {spec} has no variant {variant!r} (it has: {names})")
    running = running_models(s, _model_name(s, version), [d.id for d in devices])
    cannot = [d.id for d in devices if choose_variant(
        dict(d.runtimes or {}), getattr(running.get(d.id), "variant", None), options,
        variant).variant is None]
    if cannot:
        shown = ", ".join(cannot[:5]) + (f" and {len(cannot) - 5} more" if len(cannot) > 5
                                         else "")
        raise UsageError(f"{len(cannot)} of {len(devices)} devices in group {group_name} cannot "
                         f"load variant {variant} ({shown}); see `fleetctl rollout plan {spec} "
                         f"--group {group_name} --variant {variant}`")


def _model_name(s: Session, version: ModelVersion) -> str:
    model = s.get(Model, version.model_id)
    assert model is not None
    return model.name


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
                 variant: str | None = None,
                 prefer: str | None = None) -> dict[str, Any]:
    """What a rollout would do, per device, before anything is sent: ``planner.plan_target``
    as dispatch calls it, given what the server's store holds (``blob_problem``) and the pairs
    no delta could be built for. ``bytes`` is what the device would be sent (a full artifact:
    the compressed model when the catalog has one and its blob is intact; for "delta?", a
    delta not built yet, the full artifact as the upper bound); ``full_bytes`` is the model
    file's size. ``variant``: the pin (``--variant``); devices that cannot load it are listed
    as unable to take the model, with why."""
    version = catalog.resolve_version(s, spec)
    model = s.get(Model, version.model_id)
    assert model is not None
    options = catalog.variant_options(s, version.id)
    if variant is not None and variant not in {o.name for o in options}:
        names = ", ".join(sorted(o.name for o in options))
        raise UsageError(f"version {spec} has no variant {variant!r} (it has: {names})")
    deltas = load_deltas(s, [o.sha256 for o in options])
    devices = fleet.devices_in_group(s, group_name, models=False)
    seen: dict[str, str | None] = {}  # one look at the store per blob, not per device

    def problem(sha: str) -> str | None:
        if sha not in seen:
            seen[sha] = blob_problem(sha)
        return seen[sha]

    running = running_models(s, model.name, [d.id for d in devices])
    selecting = select_for(s, version.id, options, devices, prefer) if prefer else {}
    choices, by_type = type_plans(selecting, options) if selecting else ({}, [])
    selecting = {i: Selecting(x.device, x.facts, x.objective, x.benchmarks, x.baselines,
                              choices[i]) for i, x in selecting.items()}
    rows = []
    total = full = 0
    for d in devices:
        now_runs = running.get(d.id)
        plan = plan_target(d.runtimes or {}, now_runs, options, deltas=deltas,
                           failed_deltas=failed_deltas or {}, blob_problem=problem,
                           pinned=variant, selecting=selecting.get(d.id))
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
           "variant": variant, "devices": rows, "bytes": total, "full_bytes": full,
           "cannot_take": sum(1 for r in rows if not r["can_take"])}
    if selecting:
        out["prefer"] = prefer
        out["device_types"] = by_type
    return out


def select_for(s: Session, version_id: int, options: list, devices: list,
               prefer: str) -> dict[str, Any]:
    """Per device id the planner's ``Selecting`` (``--prefer``; docs/portraits.md)."""
    from .fleet.portraits import selecting_for  # noqa: PLC0415
    from .selection import Objective  # noqa: PLC0415

    try:
        objective = Objective.parse(prefer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return selecting_for(s, version_id, options, devices, objective)


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
    """A rollout as ``fleetctl rollout status --json`` prints it (``reads.rollout_json``: the
    same statements fleetctl runs on the store without SQLAlchemy)."""
    return reads.rollout_json(reads.SessionReader(s), r.id, with_targets=with_targets)


def device_selection(s: Session, device_id: str) -> dict[str, Any]:
    """Why the device gets the variant it does: per model, its newest rollout target (the
    variant recorded at dispatch, ``delivery``: why delta or full) and what the rollout's rule
    picks for it now, with why (``--variant`` pin, ``--prefer`` selection on today's portrait
    and benchmarks, else by format: the variant it runs, then "default")."""
    d = fleet.get_device(s, device_id)
    newest: dict[int, RolloutTarget] = {}
    rows = s.execute(select(RolloutTarget, Rollout.model_id)
                     .join(Rollout, Rollout.id == RolloutTarget.rollout_id)
                     .where(RolloutTarget.device_id == d.id)
                     .order_by(RolloutTarget.rollout_id.desc())).all()
    for t, model_id in rows:
        newest.setdefault(model_id, t)
    out = []
    for model_id, t in sorted(newest.items()):
        r = get_rollout(s, t.rollout_id)
        model, version = s.get(Model, model_id), s.get(ModelVersion, r.version_id)
        assert model is not None and version is not None
        policy = RolloutPolicy.from_json(r.policy)
        options = catalog.variant_options(s, version.id)
        running = running_models(s, model.name, [d.id]).get(d.id)
        if policy.variant is not None:
            choice = choose_variant(dict(d.runtimes or {}), None, options, policy.variant)
            why = choice.reason or f"pinned by the rollout (--variant {policy.variant})"
        elif policy.prefer is not None:
            choice = select_choice(select_for(s, version.id, options, [d], policy.prefer)[d.id],
                                   options)
            why = f"--prefer {policy.prefer}: {choice.reason}"
        else:
            runs = running.variant if running else None
            choice = choose_variant(dict(d.runtimes or {}), runs, options)
            name = choice.variant.name if choice.variant else None
            why = choice.reason or "by format (no --prefer): " + (
                "the variant it runs" if name == runs else "the default variant"
                if name == "default" else "the first variant it can load")
        recorded = s.get(Variant, t.variant_id) if t.variant_id is not None else None
        out.append({"model": model.name, "version": version.version, "rollout_id": r.id,
                    "rollout_state": r.state, "state": t.state,
                    "variant": recorded.name if recorded else None,
                    "chosen_now": choice.variant.name if choice.variant else None, "why": why,
                    "delivery": t.delivery or "", "prefer": policy.prefer,
                    "pinned": policy.variant})
    return {"device": d.id, "models": out}


def rollout_events(s: Session, rollout_id: int, *, after: int | None = None,
                   limit: int = 500) -> list[dict[str, Any]]:
    """A rollout's device events (each target's state move, ``rollout_events``), oldest first:
    those after event id ``after``, or the last ``limit`` when ``after`` is None."""
    q = select(RolloutEvent).where(RolloutEvent.rollout_id == rollout_id)
    if after is None:
        rows = list(reversed(s.scalars(q.order_by(RolloutEvent.id.desc()).limit(limit)).all()))
    else:
        rows = list(s.scalars(q.where(RolloutEvent.id > after).order_by(RolloutEvent.id)
                              .limit(limit)).all())
    return [{"id": e.id, "rollout_id": e.rollout_id, "device": e.device_id,
             "from": e.from_state, "to": e.to_state, "reason": e.reason,
             "at": e.at.astimezone(UTC).isoformat()} for e in rows]


def list_rollouts(s: Session) -> list[Rollout]:
    return list(s.scalars(select(Rollout).order_by(Rollout.id.desc())).all())
