"""The rollout controller: a reconciler over SQL state. It does no network I/O; it returns
the retained manifests to publish and the daemon publishes them.

Per rollout, every tick::

    running      add targets for devices that joined the group; release expired holds;
                 time out stuck devices; check the failure threshold (-> pause | abort |
                 rollback); dispatch pending targets of the waves opened so far (respecting
                 --max-concurrent and holds); open the next wave when the current one is
                 settled; complete when every wave is open and every target is terminal.
    paused       nothing new is dispatched; device events are still recorded.
    aborting     clear undelivered manifests, cancel what has not finished -> aborted.
    rolling_back every device the rollout touched gets a new manifest for the model it ran
                 before (a higher serial, never a replay) -> rolled_back when all reverted.

Target states: pending -> notified -> downloading -> applying -> trial -> healthy; a failure
(failed / rejected / rolled_back by the agent, or a timeout) holds the device out for an
exponentially growing while (held -> pending) until --max-attempts, then it stays failed.
Rollback: -> reverting -> reverted. Never dispatched: skipped (cannot take the model) or
cancelled (rollout aborted / superseded / rolled back before it got there).

A blob of the server's own store that does not hash to its name is never shipped (see
``store.BlobVerifier``): a corrupt delta falls back to the full artifact, a corrupt compressed
form to the model file; with nothing intact to send the target stays pending with the reason
``held: server blob <sha12> corrupt (store)`` (a notified/downloading one is taken back to
pending), which is no device failure (no attempt used, not counted toward the threshold). It is
planned again every tick, so it goes out as soon as the blob is repaired. Each corruption is
logged once, with what depends on the blob.

Several server replicas may run against one PostgreSQL: each rollout is worked by the replica
holding its row lease (``lease_owner`` / ``lease_until``, renewed every tick, taken over when it
expires). Rows are read ``FOR UPDATE SKIP LOCKED`` so two replicas never work one rollout in the
same instant. A replica that takes over re-sends the manifests already recorded as sent, because
the old owner may have died between its commit and its publish (agents ignore a manifest they
already have).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from deltafleet.shared import (
    ArtifactRef,
    Event,
    Hello,
    Manifest,
    SigningKey,
    Topics,
)

from . import registry
from .delivery.artifacts import ArtifactChunks
from .deltas import DeltaBuilder
from .planner import FullArtifact, VariantOption, choose_variant, delta_worth_it
from .policy import (
    IN_FLIGHT_STATES,
    TERMINAL_STATES,
    RolloutPolicy,
    WaveView,
    failures_breach,
    wave_settled,
)
from .store import BlobCheck, BlobStore, BlobVerifier
from .store.models import (
    Artifact,
    Device,
    DeviceModel,
    Group,
    Model,
    ModelVersion,
    Rollout,
    RolloutTarget,
    Variant,
)
from .storecheck import dependents, hold_reason

log = logging.getLogger(__name__)

ACTIVE_ROLLOUT_STATES = ("running", "paused", "aborting", "rolling_back")
PROGRESS_ORDER = {"pending": 0, "notified": 1, "downloading": 2, "applying": 3, "trial": 4}
CONTROLLER = "controller"


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = True


LEASE_S = 5.0


class RolloutController:
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
        self.artifacts = ArtifactChunks(self.verifier)
        self._checked: dict[str, BlobCheck] = {}  # this tick's verdicts: one stat per blob

    def _check(self, sha: str) -> BlobCheck:
        check = self._checked.get(sha)
        if check is None:
            check = self._checked[sha] = self.verifier.check(sha)
        return check

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
        rows = s.execute(query).all()
        return [(t, r, name) for t, r, name in rows]

    def on_hellos(self, s: Session, hellos: list[Hello], now: datetime) -> list[Publish]:
        """Record the devices; re-send manifests still in flight (a broker may have lost them).
        A fixed number of queries per batch, whatever its size."""
        if not hellos:
            return []
        registry.upsert_devices_from_hellos(s, hellos, now)
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
            registry.record_device_model(s, ev.device_id, ev.model, ev.version
                                         if ev.version != "?" else None, None, ev.sha256, now)
        match = None
        for t, r, model_name in self.open_targets(s, ev.device_id, lock=True):
            if model_name == ev.model and (ev.manifest_id is None
                                           or t.manifest_id == ev.manifest_id):
                match = (t, r)
        if match is None:
            return
        t, r = match
        policy = RolloutPolicy.from_json(r.policy)
        if ev.state == "waiting":  # the device goes on by itself: no attempt, no deadline
            self._set(t, t.state, f"waiting on the device: {ev.reason}", now)
            return
        if t.state == "reverting":
            if ev.state == "healthy":
                self._set(t, "reverted", "back on the version it ran before", now)
            elif ev.state in ("failed", "rejected", "rolled_back"):
                self._set(t, "failed", f"rollback failed: {ev.reason}", now)
            return
        if ev.state in PROGRESS_ORDER:
            if PROGRESS_ORDER.get(t.state, 9) < PROGRESS_ORDER[ev.state]:
                window = policy.health_window_s if ev.state == "trial" else 0
                self._set(t, ev.state, "", now, timeout_s=policy.state_timeout_s + window)
        elif ev.state == "healthy":
            t.health = dict(ev.health)
            self._set(t, "healthy", ev.reason, now)
        else:  # failed | rejected | rolled_back
            t.health = dict(ev.health)
            self._fail(t, policy, ev.state, ev.reason, now)

    # -- reconciliation --------------------------------------------------------------------
    def reconcile(self, s: Session, now: datetime) -> tuple[list[Publish], dict[str, int]]:
        """One pass over every active rollout. Returns manifests to publish and the artifacts
        devices may ask chunks of, each with its bandwidth cap in bytes/s (0 = none)."""
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
            targets = list(s.scalars(select(RolloutTarget)
                                     .where(RolloutTarget.rollout_id == r.id)
                                     .with_for_update()).all())
            if took_over:
                out += [Publish(self.topics.desired(t.device_id, model.name), t.manifest.encode())
                        for t in targets if t.state in IN_FLIGHT_STATES and t.manifest]
            if r.state == "running":
                out += self._run(s, r, model, targets, now)
            elif r.state == "paused":
                self._expire(s, r, targets, now)
            elif r.state == "aborting":
                out += self._abort(r, model, targets, now)
            elif r.state == "rolling_back":
                self._expire(s, r, targets, now)
                out += self._roll_back(s, r, model, targets, now)
            self._hold_for_store(r, targets, now)
            rate = int(r.policy.get("bandwidth_bytes_per_s") or 0)
            for t in targets:
                if (t.state in IN_FLIGHT_STATES and t.artifact_sha256
                        and self._check(t.artifact_sha256).ok):
                    known = servable.get(t.artifact_sha256)
                    caps = [x for x in (known, rate) if x]  # the tightest cap wins
                    servable[t.artifact_sha256] = min(caps) if caps else 0
        self._report_bad_blobs(s, now)
        return out, servable

    def _hold_for_store(self, r: Rollout, targets: list[RolloutTarget], now: datetime) -> None:
        """Take back to pending the targets still fetching a blob found bad since it was sent:
        they are planned again (a fallback, or the repaired blob under a new manifest). Their
        old manifest's events no longer match (manifest_id cleared), the attempt is given
        back, and nothing counts against the device."""
        if r.state not in ("running", "paused"):
            return
        for t in targets:
            if t.state in ("notified", "downloading") and t.artifact_sha256:
                check = self._check(t.artifact_sha256)
                if not check.ok:
                    t.attempts = max(0, t.attempts - 1)
                    t.manifest_id = None
                    self._set(t, "pending", hold_reason(check), now)

    def _report_bad_blobs(self, s: Session, now: datetime) -> None:
        """Log each newly found bad blob once, naming what depends on it (server-side)."""
        for check in self.verifier.take_new_problems():
            deps = dependents(s, check.sha256)
            log.error("server blob %s is %s (store) and is not shipped; depends on it: %s; "
                      "run `fleetctl store verify --repair`", check.sha256, check.problem,
                      deps.summary())
            registry.audit(s, CONTROLLER, "store.blob_bad", f"blob/{check.sha256}",
                           {"problem": check.problem, **deps.to_json()})

    def _run(self, s: Session, r: Rollout, model: Model, targets: list[RolloutTarget],
             now: datetime) -> list[Publish]:
        policy = RolloutPolicy.from_json(r.policy)
        group = s.get(Group, r.group_id)
        assert group is not None
        devices = {d.id: d for d in s.scalars(select(Device)).all()}
        have = {t.device_id for t in targets}
        for device in devices.values():
            if device.id not in have and registry.device_matches(device, group.selector):
                t = RolloutTarget(rollout_id=r.id, device_id=device.id, state="pending",
                                  reason="joined the group during the rollout",
                                  wave=r.current_wave, attempts=0, health={}, updated_at=now)
                s.add(t)
                targets.append(t)
        self._expire(s, r, targets, now)
        views = [WaveView(t.wave, t.state, devices[t.device_id].online) for t in targets
                 if t.device_id in devices]
        breached, failures, dispatched = failures_breach(views, r.current_wave, policy,
                                                         r.failures_acknowledged)
        if breached:
            reason = (f"{failures} of {dispatched} devices failed, more than the "
                      f"{policy.max_failure_pct:g}% allowed")
            next_state = {"pause": "paused", "abort": "aborting",
                          "rollback": "rolling_back"}[policy.on_failure]
            log.warning("rollout %d: %s -> %s", r.id, reason, next_state)
            self._set_rollout(r, next_state, reason, now)
            registry.audit(s, CONTROLLER, f"rollout.{policy.on_failure}", f"rollout/{r.id}",
                           {"reason": reason, "automatic": True})
            return []
        out = self._dispatch(s, r, model, policy, targets, devices, now)
        last_wave = policy.wave_count() - 1
        views = [WaveView(t.wave, t.state, devices[t.device_id].online) for t in targets
                 if t.device_id in devices]
        while r.current_wave < last_wave and wave_settled(views, r.current_wave):
            r.current_wave += 1
            r.updated_at = now
            log.info("rollout %d: wave %d opened", r.id, r.current_wave)
            out += self._dispatch(s, r, model, policy, targets, devices, now)
            views = [WaveView(t.wave, t.state, devices[t.device_id].online) for t in targets
                     if t.device_id in devices]
        if r.current_wave >= last_wave and targets and all(
                t.state in TERMINAL_STATES for t in targets):
            failed = sum(1 for t in targets if t.state not in ("healthy", "skipped"))
            self._set_rollout(r, "completed",
                              f"{failed} device(s) did not update" if failed else "", now)
            r.finished_at = now
            log.info("rollout %d completed", r.id)
        return out

    def _expire(self, s: Session, r: Rollout, targets: list[RolloutTarget], now: datetime) -> None:
        """Release holds that ran out; fail devices stuck in a state past its deadline."""
        policy = RolloutPolicy.from_json(r.policy)
        for t in targets:
            if t.state == "held" and t.hold_until is not None and t.hold_until <= now:
                self._set(t, "pending", f"retrying after: {t.reason}", now)
            elif (t.state in IN_FLIGHT_STATES and t.state_deadline is not None
                  and t.state_deadline <= now):
                device = s.get(Device, t.device_id)
                if t.state in ("notified", "reverting") and device is not None and not device.online:
                    continue  # offline devices converge when they come back
                if t.state == "reverting":
                    self._set(t, "failed", "rollback timed out", now)
                else:
                    self._fail(t, policy, "failed", f"timed out in state {t.state}", now)

    def _dispatch(self, s: Session, r: Rollout, model: Model, policy: RolloutPolicy,
                  targets: list[RolloutTarget], devices: dict[str, Device],
                  now: datetime) -> list[Publish]:
        version = s.get(ModelVersion, r.version_id)
        assert version is not None
        options = registry.variant_options(s, version.id)
        in_flight = sum(1 for t in targets if t.state in IN_FLIGHT_STATES)
        out = []
        for t in sorted(targets, key=lambda t: (t.wave, t.device_id)):
            if t.state != "pending" or t.wave > r.current_wave:
                continue
            if policy.max_concurrent is not None and in_flight >= policy.max_concurrent:
                break
            device = devices.get(t.device_id)
            if device is None:
                continue
            published = self._plan_target(s, r, model, version, policy, options, t, device, now)
            if published is not None:
                out.append(published)
                in_flight += 1
        return out

    def _plan_target(self, s: Session, r: Rollout, model: Model, version: ModelVersion,
                     policy: RolloutPolicy, options: list[VariantOption], t: RolloutTarget,
                     device: Device, now: datetime) -> Publish | None:
        running = s.get(DeviceModel, (device.id, model.name))
        choice = choose_variant(device.runtimes or {}, running.variant if running else None,
                                options)
        if choice.variant is None:
            self._set(t, "skipped", choice.reason, now)
            return None
        v = choice.variant
        t.variant_id, t.target_sha256, t.full_bytes = v.variant_id, v.sha256, v.size_bytes
        if t.attempts == 0:
            t.previous_sha256 = running.sha256 if running else None
            t.previous_version = running.version if running else None
        if running is not None and running.sha256 == v.sha256:
            self._set(t, "healthy", "device already runs the target", now)
            return None
        base = (running.sha256 if running is not None and self._check(running.sha256).ok
                else None)
        full = self._full_artifact(v)
        kind, codec, artifact_sha, artifact_size = "full", full.codec, full.sha256, full.size_bytes
        if base is not None:
            delta = registry.best_delta(s, base, v.sha256)
            if (delta is None and (base, v.sha256) not in self.deltas.failed
                    and self._check(v.sha256).ok):
                self.deltas.submit(base, self.blobs.path(base), v.sha256, self.blobs.path(v.sha256),
                                   reference_bytes=full.size_bytes)
                t.reason = "building delta"
                return None  # stays pending until the delta is built
            if (delta is not None and delta_worth_it(delta.size_bytes, full.size_bytes)
                    and self._check(delta.artifact_sha256).ok):  # else: the full artifact
                kind, codec = "delta", delta.codec
                artifact_sha, artifact_size = delta.artifact_sha256, delta.size_bytes
        check = self._check(artifact_sha)
        if not check.ok:
            self._set(t, "pending", hold_reason(check), now)
            return None  # planned again next tick: resumes once the blob is intact
        t.attempts += 1
        return self._send(s, r, t, device, model.name, version.version, v.name, v.format,
                          v.sha256, v.size_bytes, base if kind == "delta" else None,
                          ArtifactRef(kind, codec, artifact_sha, artifact_size,
                                      self.chunk_size_bytes,
                                      self.artifacts.hashes(artifact_sha)),
                          policy, "notified", now, option=v)

    def _send(self, s: Session, r: Rollout, t: RolloutTarget, device: Device, model: str,
              version: str, variant: str, fmt: str, target_sha: str, target_size: int,
              base_sha: str | None, artifact: ArtifactRef, policy: RolloutPolicy, state: str,
              now: datetime, option: VariantOption | None = None) -> Publish:
        device.manifest_serial = (device.manifest_serial or 0) + 1
        issued = int(time.time())
        manifest = Manifest(
            manifest_id=uuid.uuid4().hex, device_id=device.id, serial=device.manifest_serial,
            issued_at=issued, expires_at=issued + self.manifest_ttl_s, rollout_id=r.id,
            model=model, version=version, variant=variant, format=fmt,
            target_sha256=target_sha, target_size_bytes=target_size, base_sha256=base_sha,
            artifact=artifact, trial_window_s=policy.health_window_s,
            health_policy=dict(policy.health), hardware_id=device.hardware_id,
            allow_io_change=policy.allow_io_change,
            io_signature=option.io_signature if option is not None else None,
            golden_inputs=option.golden if option is not None else (),
        )
        signed = self.key.sign_bytes(manifest.to_wire())
        t.base_sha256 = base_sha
        t.artifact_sha256, t.artifact_kind = artifact.sha256, artifact.kind
        t.bytes_to_send = artifact.size_bytes
        t.manifest_id, t.serial, t.manifest = manifest.manifest_id, manifest.serial, signed.decode()
        self._set(t, state, "", now, timeout_s=policy.state_timeout_s)
        return Publish(self.topics.desired(device.id, model), signed)

    def _abort(self, r: Rollout, model: Model, targets: list[RolloutTarget],
               now: datetime) -> list[Publish]:
        out = []
        for t in targets:
            if t.state in TERMINAL_STATES:
                continue
            if t.state == "notified":  # not started: withdraw the retained manifest
                out.append(Publish(self.topics.desired(t.device_id, model.name), b""))
            reason = ("rollout aborted" if t.state in ("pending", "held", "notified")
                      else f"rollout aborted while the device was in {t.state}")
            self._set(t, "cancelled", reason, now)
        self._set_rollout(r, "aborted", r.state_reason, now)
        r.finished_at = now
        return out

    def _roll_back(self, s: Session, r: Rollout, model: Model, targets: list[RolloutTarget],
                   now: datetime) -> list[Publish]:
        policy = RolloutPolicy.from_json(r.policy)
        out = []
        waiting = False  # a target waits for a bad blob of the store to be repaired
        for t in targets:
            if t.state in ("reverting", "reverted", "skipped", "cancelled"):
                continue
            if t.manifest_id is None:  # never got a manifest: nothing to undo
                self._set(t, "cancelled", "rollout rolled back before this device", now)
                continue
            device = s.get(Device, t.device_id)
            assert device is not None
            if t.previous_sha256 is None:
                out.append(Publish(self.topics.desired(t.device_id, model.name), b""))
                self._set(t, "failed", "nothing to roll back to: the device ran no version "
                                       "of this model before", now)
                continue
            prev = s.execute(
                select(Variant, ModelVersion.version, Artifact.size_bytes)
                .join(ModelVersion, ModelVersion.id == Variant.version_id)
                .join(Artifact, Artifact.sha256 == Variant.artifact_sha256)
                .where(Variant.artifact_sha256 == t.previous_sha256,
                       ModelVersion.model_id == model.id)).first()
            if prev is None or not self.blobs.has(t.previous_sha256):
                self._set(t, "failed", "the previous model is not in the catalog", now)
                continue
            v, version, size = prev
            option = registry.variant_option(v, size)
            full = self._full_artifact(option)
            check = self._check(full.sha256)
            if not check.ok:
                t.reason, waiting = hold_reason(check), True
                continue
            artifact = ArtifactRef("full", full.codec, full.sha256, full.size_bytes,
                                   self.chunk_size_bytes, self.artifacts.hashes(full.sha256))
            out.append(self._send(s, r, t, device, model.name, version, v.name, v.format,
                                  t.previous_sha256, size, None, artifact, policy,
                                  "reverting", now, option=option))
        if not waiting and all(t.state != "reverting" for t in targets):
            self._set_rollout(r, "rolled_back", r.state_reason, now)
            r.finished_at = now
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _full_artifact(self, v: VariantOption) -> FullArtifact:
        """The compressed model when the catalog has one and its blob is in the store, else the
        model file as it is (variants registered before full models shipped compressed)."""
        if v.compressed is not None and not self._check(v.compressed.sha256).ok:
            log.warning("compressed form %s of %s is missing or corrupt in the blob store; "
                        "shipping the model as it is", v.compressed.sha256[:12], v.sha256[:12])
            return v.identity
        return v.full

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

    def _fail(self, t: RolloutTarget, policy: RolloutPolicy, state: str, reason: str,
              now: datetime) -> None:
        if t.attempts < policy.max_attempts:
            hold = policy.hold_seconds(t.attempts)
            t.hold_until = now + timedelta(seconds=hold)
            self._set(t, "held", f"{state}: {reason} (attempt {t.attempts} of "
                                 f"{policy.max_attempts}; retry in {hold} s)", now)
        else:
            self._set(t, state, f"{reason} (held out after {t.attempts} failed attempts)", now)

    @staticmethod
    def _set(t: RolloutTarget, state: str, reason: str, now: datetime, *,
             timeout_s: int | None = None) -> None:
        t.state, t.reason, t.updated_at = state, reason, now
        t.state_deadline = now + timedelta(seconds=timeout_s) if timeout_s else None

    @staticmethod
    def _set_rollout(r: Rollout, state: str, reason: str, now: datetime) -> None:
        r.state, r.state_reason, r.updated_at = state, reason, now


def utcnow() -> datetime:
    return datetime.now(UTC)
