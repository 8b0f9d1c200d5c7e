"""Loading a rollout's ``engine.Snapshot`` from SQL: what one tick of one rollout looks at.

``load_targets`` reads the targets that may need a decision now (due holds and deadlines, the
pending ones of open waves up to the concurrency budget, what an abort or a rollback must
touch, targets of an artifact found corrupt), their devices and the devices that may have
joined the rollout's group (``joiners``); ``snapshot`` adds the variants, deltas, running
models, selection inputs and rollback options and builds the engine's view. ``Seen`` is what
a replica remembers of a rollout between ticks. No function here writes; the adapter
(``sql.RolloutController``) takes the lease before and applies the decisions after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .. import catalog, fleet
from ..fleet.devices import TRIAL
from ..fleet.portraits import selecting_for
from ..planner import DeltaOption, RunningModel, Selecting
from ..policy import RolloutPolicy
from ..selection import Objective
from ..store.models import (
    Artifact,
    Delta,
    Device,
    DeviceModel,
    Group,
    Model,
    ModelVersion,
    Rollout,
    RolloutTarget,
    Variant,
)
from . import engine
from .states import ACTIVE_ROLLOUT_STATES, IN_FLIGHT_STATES, TERMINAL_STATES, VERDICT_STATES, RolloutState
from .states import TargetState as T

__all__ = ["Seen", "joiners", "load_deltas", "load_targets", "rollback_options",
           "running_models", "running_states", "selecting_inputs", "snapshot", "target_view"]

SWEEP_EVERY = timedelta(seconds=60)  # every device without a target is looked at this often
LOOK_BACK = timedelta(seconds=5)  # hellos committed late by another process are still seen
FLYING_EVERY = timedelta(seconds=5)  # in-flight artifacts are read again at least this often


@dataclass(slots=True)
class Seen:
    """What this replica remembers of one rollout between ticks (forgotten on takeover):
    when it last looked for devices that joined its group, when it last looked at every
    device, the pending targets planning left waiting (a delta being built, a blob on
    hold), which are planned again every tick without using the concurrency budget, and the
    artifacts the rollout dispatched (None: not read yet), kept servable while devices are
    still to go (offline devices are dispatched when they come back and mostly need the same
    artifact: its chunks stay retained instead of being cleared and published again)."""

    looked_at: datetime | None = None
    swept_at: datetime | None = None
    waiting: set[str] = field(default_factory=set)
    sent: set[str] | None = None
    # (artifact, state) of the targets with a manifest out, read at most every FLYING_EVERY
    # and grown by this replica's dispatches in between: a scan of every in-flight target
    # each tick would cost devices x duration
    flying: set[tuple[str, str]] | None = None
    flying_at: datetime | None = None

    def in_flight(self, read: Callable[[], set[tuple[str, str]]],
                  now: datetime) -> set[tuple[str, str]]:
        if self.flying is None or self.flying_at is None or now - self.flying_at >= FLYING_EVERY:
            self.flying, self.flying_at = read(), now
        return self.flying

    def dispatched(self, decisions: engine.Decisions, read: Callable[[], set[tuple[str, str]]],
                   now: datetime) -> set[tuple[str, str]]:
        """After this tick's decisions: dispatches join the set; a rollout-level move (abort,
        rollback, pause, ...) or a withdrawal reads it again."""
        if any(isinstance(d, engine.SetRollout | engine.Withdraw) for d in decisions):
            self.flying_at = None
            return self.in_flight(read, now)
        self.flying = (self.flying or set()) | {
            (d.artifact_sha256, str(d.state)) for d in decisions
            if isinstance(d, engine.Dispatch) and d.artifact_sha256}
        return self.flying

    def note(self, decisions: engine.Decisions) -> None:
        for d in decisions:
            if isinstance(d, engine.SetReason) or (
                    isinstance(d, engine.SetTarget) and d.state == T.PENDING):
                self.waiting.add(d.device_id)
            elif isinstance(d, engine.SetTarget | engine.Dispatch):
                self.waiting.discard(d.device_id)


def load_deltas(s: Session, target_shas: Iterable[str]) -> dict[tuple[str, str], DeltaOption]:
    """The smallest stored delta per (base, target) for these targets."""
    out: dict[tuple[str, str], DeltaOption] = {}
    for d in s.scalars(select(Delta).where(Delta.target_sha256.in_(set(target_shas)))
                       .order_by(Delta.size_bytes.desc())):
        out[(d.base_sha256, d.target_sha256)] = DeltaOption(d.codec, d.artifact_sha256,
                                                            d.size_bytes)
    return out


def running_models(s: Session, model_name: str,
                   device_ids: Iterable[str] | None = None) -> dict[str, RunningModel]:
    """What each device reports it runs of the model."""
    return {i: run for i, (run, _) in running_states(s, model_name, device_ids).items()}


def running_states(s: Session, model_name: str, device_ids: Iterable[str] | None = None,
                   ) -> dict[str, tuple[RunningModel, bool]]:
    """What each device reports it runs of the model, and whether it runs it in a trial."""
    query = select(DeviceModel).where(DeviceModel.model_name == model_name)
    if device_ids is not None:
        query = query.where(DeviceModel.device_id.in_(set(device_ids)))
    return {m.device_id: (RunningModel(m.sha256, m.variant, m.version),
                          m.state == TRIAL) for m in s.scalars(query)}


def target_view(t: RolloutTarget) -> engine.TargetView:
    return engine.TargetView(t.device_id, t.wave, T(t.state), t.reason, t.attempts, t.hold_until,
                             t.state_deadline, t.manifest_id, t.artifact_sha256,
                             t.previous_sha256, t.artifact_kind, t.bytes_to_send)


def load_targets(s: Session, r: Rollout, counts: dict[tuple[int, str], int],
                 flying: set[tuple[str, str]], seen: Seen, ok: Callable[[str], bool],
                 now: datetime,
                 ) -> tuple[dict[str, RolloutTarget], dict[str, Device], dict[int, int]]:
    """The targets of ``r`` that may need a decision now, their devices, the devices
    that may have joined its group, and the current wave's online waiting count when the
    wave rule needs it."""
    state = RolloutState(r.state)
    by = RolloutTarget
    mine = by.rollout_id == r.id
    wanted: list = []
    if state == RolloutState.ABORTING:
        wanted.append(select(by).where(mine, by.state.not_in(TERMINAL_STATES)))
    else:
        wanted.append(select(by).where(mine, by.state == T.HELD, by.hold_until <= now))
        wanted.append(select(by).join(Device, Device.id == by.device_id).where(
            mine, by.state.in_(IN_FLIGHT_STATES), by.state_deadline <= now,
            Device.online.is_(True) | by.state.not_in((T.NOTIFIED, T.REVERTING))))
    if state == RolloutState.ROLLING_BACK:
        wanted.append(select(by).where(mine, by.state.not_in(
            (T.REVERTING, T.REVERTED, T.SKIPPED, T.CANCELLED))))
    if state in (RolloutState.RUNNING, RolloutState.PAUSED):
        bad = {sha for sha, st in flying
               if st in (T.NOTIFIED, T.DOWNLOADING) and not ok(sha)}
        if bad:
            wanted.append(select(by).where(mine, by.state.in_((T.NOTIFIED, T.DOWNLOADING)),
                                           by.artifact_sha256.in_(bad)))
    rows: dict[str, RolloutTarget] = {}

    def fetch(queries: list) -> None:
        for query in queries:
            for t in s.scalars(query.with_for_update(of=RolloutTarget)).all():
                rows.setdefault(t.device_id, t)

    fetch(wanted)
    wanted = []
    if state == RolloutState.RUNNING:
        limit = RolloutPolicy.from_json(r.policy).max_concurrent
        in_flight = sum(n for (_, st), n in counts.items() if st in IN_FLIGHT_STATES)
        # every due target may free a slot (a timeout) or take one (a hold ran out)
        budget = None if limit is None else max(0, limit - in_flight + len(rows))
        if budget != 0:
            # offline devices wait: nothing is dispatched to them (see engine)
            pending = (select(by).join(Device, Device.id == by.device_id)
                       .where(mine, by.state == T.PENDING, by.wave <= r.current_wave,
                              Device.online.is_(True))
                       .order_by(by.wave, by.device_id))
            if seen.waiting:
                pending = pending.where(by.device_id.not_in(seen.waiting))
                wanted.append(select(by).where(mine, by.state == T.PENDING,
                                               by.device_id.in_(seen.waiting)))
            wanted.append(pending if budget is None else pending.limit(budget))
    fetch(wanted)
    devices = {d.id: d for d in s.scalars(select(Device).where(Device.id.in_(rows)))} \
        if rows else {}
    if state == RolloutState.RUNNING:
        devices.update(joiners(s, r, seen, now))
    waiting_online: dict[int, int] = {}
    wave = r.current_wave
    members = {st: n for (w, st), n in counts.items() if w == wave}
    if (state == RolloutState.RUNNING and members.get(T.HEALTHY)
            and any(st not in VERDICT_STATES for st in members)):
        waiting_online[wave] = s.scalar(
            select(func.count()).select_from(by).join(Device, Device.id == by.device_id)
            .where(mine, by.wave == wave, by.state.not_in(VERDICT_STATES),
                   Device.online.is_(True))) or 0
    return rows, devices, waiting_online

def joiners(s: Session, r: Rollout, seen: Seen, now: datetime) -> dict[str, Device]:
    """Devices with no target in ``r`` that said hello since the last look (every device
    without one on the first look and once a minute): the engine adds those in its group."""
    other = (select(RolloutTarget.id).join(Rollout, Rollout.id == RolloutTarget.rollout_id)
             .where(RolloutTarget.device_id == Device.id, Rollout.id != r.id,
                    Rollout.model_id == r.model_id,
                    Rollout.state.in_(ACTIVE_ROLLOUT_STATES),
                    RolloutTarget.state.not_in(TERMINAL_STATES)))
    # one active rollout works a device per model: one that has it open keeps it
    query = select(Device).where(~select(RolloutTarget.id).where(
        RolloutTarget.rollout_id == r.id, RolloutTarget.device_id == Device.id).exists(),
        ~other.exists())
    if seen.swept_at is not None and now - seen.swept_at < SWEEP_EVERY:
        query = query.where(Device.last_seen >= (seen.looked_at or now) - LOOK_BACK)
    else:
        seen.swept_at = now
    seen.looked_at = now
    return {d.id: d for d in s.scalars(query)}

def snapshot(s: Session, r: Rollout, model: Model, rows: dict[str, RolloutTarget],
             devices: dict[str, Device], counts: dict[tuple[int, str], int],
             waiting_online: dict[int, int], *, failed_deltas: Mapping[tuple[str, str], str],
             blob_problem: Callable[[str], str | None],
             has_blob: Callable[[str], bool]) -> engine.Snapshot:
    """What ``engine.step`` decides on: the rollout, the loaded targets and devices (with
    their selection inputs), the variants and deltas, what a rollback could restore."""
    state = RolloutState(r.state)
    version = s.get(ModelVersion, r.version_id)
    assert version is not None
    options: tuple = ()
    deltas: dict = {}
    selector = None
    if state == RolloutState.RUNNING:
        group = s.get(Group, r.group_id)
        assert group is not None
        selector = group.selector
        if rows or devices:
            options = tuple(catalog.variant_options(s, version.id))
            deltas = load_deltas(s, [o.sha256 for o in options])
    running = (running_states(s, model.name, devices)
               if state == RolloutState.RUNNING and devices else {})
    policy = RolloutPolicy.from_json(r.policy)
    selecting = (selecting_inputs(s, version.id, options, rows, devices, policy.prefer)
                 if options and policy.prefer and policy.variant is None else {})
    views = {i: engine.DeviceView(
        i, bool(d.online), dict(d.runtimes or {}), running[i][0] if i in running else None,
        selector is not None and fleet.device_matches(d, selector), d.last_seen,
        selecting.get(i), i in running and running[i][1])
        for i, d in devices.items()}
    previous = (rollback_options(s, model, rows.values(), has_blob)
                if state == RolloutState.ROLLING_BACK else {})
    return engine.Snapshot(
        engine.RolloutView(r.id, state, policy, version.version,
                           r.current_wave, r.failures_acknowledged, r.state_reason),
        tuple(target_view(t) for t in rows.values()), views, options, deltas,
        dict(failed_deltas), previous, blob_problem, counts, waiting_online)

def selecting_inputs(s: Session, version_id: int, options: tuple,
                     rows: dict[str, RolloutTarget], devices: dict[str, Device],
                     prefer: str) -> dict[str, Selecting]:
    """The selection inputs of the devices this tick may plan (pending or held targets,
    devices without one: joiners), loaded once per tick in a fixed number of queries."""
    planned = [d for i, d in devices.items()
               if i not in rows or rows[i].state in (T.PENDING, T.HELD)]
    return selecting_for(s, version_id, options, planned, Objective.parse(prefer))

def rollback_options(s: Session, model: Model, targets: Iterable[RolloutTarget],
                     has_blob: Callable[[str], bool]) -> dict[str, engine.RollbackOption]:
    """The model files targets ran before, as the catalog has them and the store holds."""
    shas = {t.previous_sha256 for t in targets if t.previous_sha256}
    out: dict[str, engine.RollbackOption] = {}
    for v, version, size in s.execute(
            select(Variant, ModelVersion.version, Artifact.size_bytes)
            .join(ModelVersion, ModelVersion.id == Variant.version_id)
            .join(Artifact, Artifact.sha256 == Variant.artifact_sha256)
            .where(Variant.artifact_sha256.in_(shas), ModelVersion.model_id == model.id)
            .order_by(Variant.id)).all():
        if v.artifact_sha256 not in out and has_blob(v.artifact_sha256):
            out[v.artifact_sha256] = engine.RollbackOption(
                version, catalog.variant_option(v, size))
    return out
