"""The SQL adapter of the rollout engine: lease, load, decide (``engine``), apply.

It does no network I/O: it returns the retained manifests to publish and the daemon publishes
them. Per tick and active rollout it takes the row lease, loads a ``Snapshot`` (one query per
kind of row), calls ``engine.step`` and carries the decisions out on the ORM rows, every
state change through ``states.transition``; device events go through ``engine.on_event`` the
same way.

Several server replicas may run against one PostgreSQL: each rollout is worked by the replica
holding its row lease (``lease_owner`` / ``lease_until``, renewed every tick, taken over when it
expires). Rows are read ``FOR UPDATE SKIP LOCKED`` so two replicas never work one rollout in the
same instant. A replica that takes over re-sends the manifests already recorded as sent, because
the old owner may have died between its commit and its publish (agents ignore a manifest they
already have).

With ``--prefer`` (``policy.prefer``) the selection inputs of the devices a tick may plan
(portraits, own benchmarks, their types' baselines) are loaded once per tick in a fixed number
of queries (``fleet.portraits.selecting_for``) and handed to the engine on each
``DeviceView.selecting``.

A blob of the server's own store that does not hash to its name is never shipped (see
``store.BlobVerifier``); verdicts are asked lazily, once per blob and tick, only for what
planning looks at. Each corruption is logged once, with what depends on the blob.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from deltafleet.shared import ArtifactRef, Event, Hello, SigningKey, Topics

from .. import catalog, fleet
from ..audit import audit
from ..delivery.artifacts import ArtifactChunks
from ..delivery.manifests import build_manifest, sign_manifest
from ..fleet.devices import TRIAL
from ..fleet.portraits import selecting_for
from ..planner import DeltaOption, RunningModel, Selecting
from ..policy import RolloutPolicy
from ..selection import Objective
from ..store import BlobCheck, BlobStore, BlobVerifier, models
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
from ..storecheck import dependents
from . import engine
from .states import (
    ACTIVE_ROLLOUT_STATES,
    IN_FLIGHT_STATES,
    TERMINAL_STATES,
    VERDICT_STATES,
    RolloutState,
    transition,
    transition_rollout,
)
from .states import TargetState as T

if TYPE_CHECKING:  # the builder's codecs import numpy: a `fleetctl` read does not need it
    from ..deltas import DeltaBuilder

log = logging.getLogger(__name__)

CONTROLLER = "controller"
LEASE_S = 5.0
SWEEP_EVERY = timedelta(seconds=60)  # every device without a target is looked at this often
LOOK_BACK = timedelta(seconds=5)  # hellos committed late by another process are still seen
FLYING_EVERY = timedelta(seconds=5)  # in-flight artifacts are read again at least this often


@dataclass(slots=True)
class _Seen:
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


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = True


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


class RolloutController:
    """Works every active rollout this replica holds the lease of, and applies device events."""

    def __init__(self, *, blobs: BlobStore, key: SigningKey, topics: Topics,
                 deltas: DeltaBuilder, chunk_size_bytes: int, manifest_ttl_s: int,
                 owner: str = "local") -> None:
        self.owner = owner
        self.blobs = blobs
        self.key = key
        self.topics = topics
        self.deltas = deltas
        self.chunk_size_bytes = chunk_size_bytes
        self.manifest_ttl_s = manifest_ttl_s
        self.verifier = BlobVerifier(blobs, chunk_size_bytes)
        self.artifacts = ArtifactChunks(self.verifier)  # shared with the daemon's chunk reads
        self._checked: dict[str, BlobCheck] = {}  # this tick's verdicts: one stat per blob
        self._seen: dict[int, _Seen] = {}  # per rollout worked here: what the last ticks saw

    def _check(self, sha: str) -> BlobCheck:
        check = self._checked.get(sha)
        if check is None:
            check = self._checked[sha] = self.verifier.check(sha)
        return check

    def blob_problem(self, sha: str) -> str | None:
        check = self._check(sha)
        return None if check.ok else check.problem

    # -- device messages -------------------------------------------------------------------
    def open_targets(self, s: Session, device_id: str, *,
                     lock: bool = False) -> list[tuple[RolloutTarget, Rollout, str]]:
        query = (
            select(RolloutTarget, Rollout, Model.name)
            .join(Rollout, Rollout.id == RolloutTarget.rollout_id)
            .join(Model, Model.id == Rollout.model_id)
            .where(RolloutTarget.device_id == device_id,
                   Rollout.state.in_(ACTIVE_ROLLOUT_STATES),
                   RolloutTarget.state.not_in(TERMINAL_STATES))
            .order_by(RolloutTarget.id)
        )
        if lock:
            query = query.with_for_update(of=RolloutTarget)
        return [(t, r, name) for t, r, name in s.execute(query).all()]

    def on_hellos(self, s: Session, hellos: list[Hello], now: datetime) -> list[Publish]:
        """Record the devices; re-send manifests still in flight (a broker may have lost them).
        A fixed number of queries per batch, whatever its size."""
        if not hellos:
            return []
        fleet.upsert_devices_from_hellos(s, hellos, now)
        rows = s.execute(
            select(RolloutTarget.device_id, RolloutTarget.manifest, Model.name)
            .join(Rollout, Rollout.id == RolloutTarget.rollout_id)
            .join(Model, Model.id == Rollout.model_id)
            .where(RolloutTarget.device_id.in_({h.device_id for h in hellos}),
                   Rollout.state.in_(ACTIVE_ROLLOUT_STATES),
                   RolloutTarget.state.in_(IN_FLIGHT_STATES),
                   RolloutTarget.manifest.is_not(None))
        ).all()
        return [Publish(self.topics.desired(device_id, model_name), str(manifest).encode())
                for device_id, manifest, model_name in rows]

    def on_event(self, s: Session, ev: Event, now: datetime) -> None:
        if ev.sha256:
            fleet.record_device_model(s, ev.device_id, ev.model, ev.version, None,
                                      ev.sha256, now, report=str(ev.state))
        match = None
        for t, r, model_name in self.open_targets(s, ev.device_id, lock=True):
            if model_name == ev.model and (ev.manifest_id is None
                                           or t.manifest_id == ev.manifest_id):
                match = (t, r)
        if match is None:
            return
        t, r = match
        # after the download, or "target already on disk" (0), or what a download fetched
        # before it failed (the engine counts it for applying and failure reports only)
        fetched = max(0, ev.bytes_received - ev.chunks_reused * self.chunk_size_bytes)
        decisions = engine.on_event(target_view(t), RolloutPolicy.from_json(r.policy),
                                    engine.Report(ev.state, ev.reason, dict(ev.health),
                                                  fetched), now)
        self._apply(s, r, "", {t.device_id: t}, {}, decisions, now)

    # -- reconciliation --------------------------------------------------------------------
    def reconcile(self, s: Session, now: datetime) -> tuple[list[Publish], dict[str, int]]:
        """One pass over every active rollout. Returns manifests to publish and the artifacts
        devices may ask chunks of, each with its bandwidth cap in bytes/s (0 = none).

        What it reads is proportional to what changed, not to the fleet: per rollout its
        counters, its due targets (``due``), the pending targets of its open waves up to the
        concurrency budget, the devices that said hello since the last look (and, once a
        minute, every device without a target, for group selectors edited meanwhile)."""
        out: list[Publish] = []
        servable: dict[str, int] = {}
        self._checked = {}
        for r in s.scalars(select(Rollout).where(Rollout.state.in_(ACTIVE_ROLLOUT_STATES))
                           .order_by(Rollout.id)
                           .with_for_update(skip_locked=True)).all():
            took_over = self._take_lease(r, now)
            if took_over is None:
                continue  # another replica holds it
            model = s.get(Model, r.model_id)
            assert model is not None
            if took_over or r.id not in self._seen:
                self._seen[r.id] = _Seen()
            if took_over:
                out += [Publish(self.topics.desired(device_id, model.name), manifest.encode())
                        for device_id, manifest in s.execute(
                            select(RolloutTarget.device_id, RolloutTarget.manifest)
                            .where(RolloutTarget.rollout_id == r.id,
                                   RolloutTarget.state.in_(IN_FLIGHT_STATES),
                                   RolloutTarget.manifest.is_not(None))).all()
                        if manifest is not None]
            counts = models.counts(s, r.id)
            seen = self._seen[r.id]
            read = partial(self._in_flight_artifacts, s, r.id)
            flying = seen.in_flight(read, now)
            rows, devices, waiting_online = self._load(s, r, counts, flying, now)
            snapshot = self._snapshot(s, r, model, rows, devices, counts, waiting_online)
            decisions = engine.step(snapshot, now)
            out += self._apply(s, r, model.name, rows, devices, decisions, now)
            seen.note(decisions)
            if decisions:
                flying = seen.dispatched(decisions, read, now)
            serves = {sha for sha, _ in flying}
            if r.state == RolloutState.RUNNING and any(
                    n for (_, st), n in counts.items() if st in (T.PENDING, T.HELD)):
                if seen.sent is None:
                    seen.sent = self._sent_artifacts(s, r.id)
                seen.sent |= {d.artifact_sha256 for d in decisions
                              if isinstance(d, engine.Dispatch) and d.state == T.NOTIFIED}
                serves |= seen.sent
            rate = int(r.policy.get("bandwidth_bytes_per_s") or 0)
            for sha in serves:
                if self._check(sha).ok:
                    known = servable.get(sha)
                    caps = [x for x in (known, rate) if x]  # the tightest cap wins
                    servable[sha] = min(caps) if caps else 0
        self._report_bad_blobs(s)
        return out, servable

    def _sent_artifacts(self, s: Session, rollout_id: int) -> set[str]:
        """The update artifacts the rollout sent so far (once per replica and rollout)."""
        return {sha for (sha,) in s.execute(
            select(RolloutTarget.artifact_sha256).distinct()
            .where(RolloutTarget.rollout_id == rollout_id,
                   RolloutTarget.artifact_kind.is_not(None),
                   RolloutTarget.artifact_sha256.is_not(None))).all() if sha is not None}

    def _in_flight_artifacts(self, s: Session, rollout_id: int) -> set[tuple[str, str]]:
        """(artifact, state) pairs of the rollout's targets with a manifest out."""
        return {(sha, state) for sha, state in s.execute(
            select(RolloutTarget.artifact_sha256, RolloutTarget.state).distinct()
            .where(RolloutTarget.rollout_id == rollout_id,
                   RolloutTarget.state.in_(IN_FLIGHT_STATES),
                   RolloutTarget.artifact_sha256.is_not(None))).all() if sha is not None}

    def _load(self, s: Session, r: Rollout, counts: dict[tuple[int, str], int],
              flying: set[tuple[str, str]], now: datetime,
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
                   if st in (T.NOTIFIED, T.DOWNLOADING) and not self._check(sha).ok}
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
        seen = self._seen[r.id]
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
            devices.update(self._joiners(s, r, seen, now))
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

    def _joiners(self, s: Session, r: Rollout, seen: _Seen, now: datetime) -> dict[str, Device]:
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

    def _snapshot(self, s: Session, r: Rollout, model: Model, rows: dict[str, RolloutTarget],
                  devices: dict[str, Device], counts: dict[tuple[int, str], int],
                  waiting_online: dict[int, int]) -> engine.Snapshot:
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
        selecting = (self._selecting(s, version.id, options, rows, devices, policy.prefer)
                     if options and policy.prefer and policy.variant is None else {})
        views = {i: engine.DeviceView(
            i, bool(d.online), dict(d.runtimes or {}), running[i][0] if i in running else None,
            selector is not None and fleet.device_matches(d, selector), d.last_seen,
            selecting.get(i), i in running and running[i][1])
            for i, d in devices.items()}
        previous = (self._previous(s, model, rows.values())
                    if state == RolloutState.ROLLING_BACK else {})
        return engine.Snapshot(
            engine.RolloutView(r.id, state, policy, version.version,
                               r.current_wave, r.failures_acknowledged, r.state_reason),
            tuple(target_view(t) for t in rows.values()), views, options, deltas,
            dict(self.deltas.failed), previous, self.blob_problem, counts, waiting_online)

    @staticmethod
    def _selecting(s: Session, version_id: int, options: tuple, rows: dict[str, RolloutTarget],
                   devices: dict[str, Device], prefer: str) -> dict[str, Selecting]:
        """The selection inputs of the devices this tick may plan (pending or held targets,
        devices without one: joiners), loaded once per tick in a fixed number of queries."""
        planned = [d for i, d in devices.items()
                   if i not in rows or rows[i].state in (T.PENDING, T.HELD)]
        return selecting_for(s, version_id, options, planned, Objective.parse(prefer))

    def _previous(self, s: Session, model: Model,
                  targets: Iterable[RolloutTarget]) -> dict[str, engine.RollbackOption]:
        """The model files targets ran before, as the catalog has them and the store holds."""
        shas = {t.previous_sha256 for t in targets if t.previous_sha256}
        out: dict[str, engine.RollbackOption] = {}
        for v, version, size in s.execute(
                select(Variant, ModelVersion.version, Artifact.size_bytes)
                .join(ModelVersion, ModelVersion.id == Variant.version_id)
                .join(Artifact, Artifact.sha256 == Variant.artifact_sha256)
                .where(Variant.artifact_sha256.in_(shas), ModelVersion.model_id == model.id)
                .order_by(Variant.id)).all():
            if v.artifact_sha256 not in out and self.blobs.has(v.artifact_sha256):
                out[v.artifact_sha256] = engine.RollbackOption(
                    version, catalog.variant_option(v, size))
        return out

    def _apply(self, s: Session, r: Rollout, model_name: str, rows: dict[str, RolloutTarget],
               devices: dict[str, Device], decisions: engine.Decisions,
               now: datetime) -> list[Publish]:
        out: list[Publish] = []
        for d in decisions:
            if isinstance(d, engine.SetTarget):
                t = rows[d.device_id]
                if d.attempts is not None:
                    t.attempts = d.attempts
                if d.forget_manifest:
                    t.manifest_id = None
                if d.hold_until is not None:
                    t.hold_until = d.hold_until
                if d.health is not None:
                    t.health = dict(d.health)
                transition(t, d.state, d.reason, now, timeout_s=d.timeout_s)
            elif isinstance(d, engine.SetReason):
                rows[d.device_id].reason = d.reason
            elif isinstance(d, engine.AddTarget):
                rows[d.device_id] = RolloutTarget(
                    rollout_id=r.id, device_id=d.device_id, state=T.PENDING.value,
                    reason=d.reason, wave=d.wave, attempts=0, health={}, updated_at=now)
                s.add(rows[d.device_id])
            elif isinstance(d, engine.RecordVariant):
                t = rows[d.device_id]
                t.variant_id, t.target_sha256 = d.option.variant_id, d.option.sha256
                t.full_bytes = d.option.size_bytes
                if d.record_previous:
                    t.previous_sha256 = d.previous.sha256 if d.previous else None
                    t.previous_version = d.previous.version if d.previous else None
            elif isinstance(d, engine.Dispatch):
                out.append(self._send(r, model_name, rows[d.device_id], devices[d.device_id],
                                      d, now))
            elif isinstance(d, engine.RecordBytes):
                t = rows[d.device_id]
                if d.rollback:
                    t.rollback_bytes_sent = (t.rollback_bytes_sent or 0) + d.bytes
                else:
                    t.bytes_sent = (t.bytes_sent or 0) + d.bytes
            elif isinstance(d, engine.Withdraw):
                out.append(Publish(self.topics.desired(d.device_id, model_name), b""))
            elif isinstance(d, engine.BuildDelta):
                self.deltas.submit(d.base_sha256, self.blobs.path(d.base_sha256),
                                   d.target_sha256, self.blobs.path(d.target_sha256),
                                   reference_bytes=d.reference_bytes)
            elif isinstance(d, engine.SetRollout):
                transition_rollout(r, d.state, d.reason, now)
                if d.finished:
                    r.finished_at = now
                log.info("rollout %d -> %s%s", r.id, d.state, f" ({d.reason})" * bool(d.reason))
            elif isinstance(d, engine.OpenWave):
                r.current_wave, r.updated_at = d.wave, now
                log.info("rollout %d: wave %d opened", r.id, d.wave)
            elif isinstance(d, engine.Audit):
                if d.details.get("automatic"):
                    log.warning("rollout %d: %s (%s)", r.id, d.action, d.details.get("reason"))
                audit(s, CONTROLLER, d.action, f"rollout/{r.id}", dict(d.details))
        return out

    def _send(self, r: Rollout, model_name: str, t: RolloutTarget, device: Device,
              d: engine.Dispatch, now: datetime) -> Publish:
        if d.warning:
            log.warning("%s", d.warning)
        t.attempts = d.attempts
        device.manifest_serial = (device.manifest_serial or 0) + 1
        artifact = ArtifactRef(d.kind, d.codec, d.artifact_sha256, d.artifact_bytes,
                               self.chunk_size_bytes, self.artifacts.hashes(d.artifact_sha256))
        manifest = build_manifest(
            device_id=device.id, hardware_id=device.hardware_id, serial=device.manifest_serial,
            rollout_id=r.id, model=model_name, version=d.version, option=d.option,
            artifact=artifact, base_sha256=d.base_sha256,
            policy=RolloutPolicy.from_json(r.policy), ttl_s=self.manifest_ttl_s)
        signed = sign_manifest(self.key, manifest)
        t.artifact_sha256 = d.artifact_sha256  # the manifest out: its chunks are served
        if d.state == T.REVERTING:  # the update's figures stay as they were
            t.rollback_bytes, t.rollback_bytes_sent = d.artifact_bytes, None
        else:
            t.base_sha256, t.artifact_kind = d.base_sha256, d.kind
            t.bytes_to_send, t.delivery = d.artifact_bytes, d.note
        t.manifest_id, t.serial, t.manifest = manifest.manifest_id, manifest.serial, signed.decode()
        transition(t, d.state, "", now, timeout_s=d.timeout_s)
        return Publish(self.topics.desired(device.id, model_name), signed)

    def _report_bad_blobs(self, s: Session) -> None:
        """Log each newly found bad blob once, naming what depends on it (server-side)."""
        for check in self.verifier.take_new_problems():
            deps = dependents(s, check.sha256)
            log.error("server blob %s is %s (store) and is not shipped; depends on it: %s; "
                      "run `fleetctl store verify --repair`", check.sha256, check.problem,
                      deps.summary())
            audit(s, CONTROLLER, "store.blob_bad", f"blob/{check.sha256}",
                  {"problem": check.problem, **deps.to_json()})

    def _take_lease(self, r: Rollout, now: datetime) -> bool | None:
        """None: another replica holds the lease. True: taken over from a replica whose lease
        expired. False: ours already (or new)."""
        if r.lease_owner not in (None, self.owner) and r.lease_until is not None \
                and r.lease_until > now:
            return None
        took_over = r.lease_owner not in (None, self.owner)
        if took_over:
            log.warning("rollout %d: taking over from %s", r.id, r.lease_owner)
        r.lease_owner = self.owner
        r.lease_until = now + timedelta(seconds=LEASE_S)
        return took_over
