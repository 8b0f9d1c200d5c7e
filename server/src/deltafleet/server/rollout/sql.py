"""The SQL adapter of the rollout engine: lease, load, decide (``engine``), apply.

It does no network I/O: it returns the retained manifests to publish and the daemon publishes
them. Per tick and active rollout it takes the row lease, loads a ``Snapshot`` (``load``: one
query per kind of row), calls ``engine.step`` and carries the decisions out on the ORM rows, every
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
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from deltafleet.shared import ArtifactRef, Event, Hello, SigningKey, Topics

from .. import fleet
from ..audit import audit
from ..delivery.artifacts import ArtifactChunks
from ..delivery.manifests import build_manifest, sign_manifest
from ..policy import RolloutPolicy
from ..store import BlobCheck, BlobStore, BlobVerifier, models
from ..store.models import (
    Device,
    Model,
    Rollout,
    RolloutTarget,
)
from ..storecheck import dependents
from . import engine
from .load import Seen, load_targets, snapshot, target_view
from .states import (
    ACTIVE_ROLLOUT_STATES,
    IN_FLIGHT_STATES,
    TERMINAL_STATES,
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


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = True


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
        self._seen: dict[int, Seen] = {}  # per rollout worked here: what the last ticks saw

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
                self._seen[r.id] = Seen()
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
            rows, devices, waiting_online = load_targets(
                s, r, counts, flying, seen, lambda sha: self._check(sha).ok, now)
            decisions = engine.step(snapshot(
                s, r, model, rows, devices, counts, waiting_online,
                failed_deltas=self.deltas.failed, blob_problem=self.blob_problem,
                has_blob=self.blobs.has), now)
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
