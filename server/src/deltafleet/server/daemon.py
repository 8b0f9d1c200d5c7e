"""`fleetctl server`: MQTT handling, rollout reconciliation and delta building in one process.

State lives in SQL. The loop is a reconciler: every tick it reads running rollouts, gives each
pending target a signed manifest (building a delta first if worth it), and finishes rollouts
whose targets are all terminal. Device messages are treated as untrusted: a message that does
not validate is logged and counted, and causes no database write.

Chunk delivery: devices publish the indices they miss on their chunkreq topic; requests are
gathered for ``CHUNK_WINDOW_S`` and each requested chunk is published once on its
content-addressed topic, serving every device subscribed to it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from deltafleet.shared import (
    ArtifactRef,
    ChunkRequest,
    DeltafleetError,
    Event,
    Hello,
    Manifest,
    SigningKey,
    Status,
    Topics,
    WireError,
    chunk_hashes_file,
    decode,
    read_chunk,
)
from deltafleet.shared.mqtt import CONNECTED, MqttClient, MqttSettings, Will
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import registry
from .config import ServerConfig
from .deltas import DeltaBuilder
from .planner import VariantOption, choose_variant, delta_worth_it
from .store import BlobStore, Store
from .store.models import (
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

log = logging.getLogger(__name__)

TERMINAL = frozenset({"healthy", "failed", "rejected", "rolled_back", "skipped"})
IN_FLIGHT = ("notified", "downloading", "applying", "trial")
EVENT_ORDER = {"pending": 0, "notified": 1, "downloading": 2, "applying": 3, "trial": 4}
CHUNK_WINDOW_S = 0.05
RECONCILE_EVERY_S = 0.5


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class ServerStats:
    messages: int = 0
    invalid_messages: int = 0
    chunks_published: int = 0
    chunk_bytes_published: int = 0


class FleetServer:
    def __init__(self, cfg: ServerConfig, store: Store | None = None) -> None:
        self.cfg = cfg
        self.store = store or Store(cfg.db_url)
        self.blobs = BlobStore(cfg.blobs_dir)
        self.key = SigningKey.load(cfg.signing_key_path)
        self.topics = Topics(cfg.topic_prefix)
        self.deltas = DeltaBuilder(cfg.home / "work")
        self.stats = ServerStats()
        self.stop_event = threading.Event()
        self._chunk_hashes: dict[str, list[str]] = {}
        self._servable: set[str] = set()
        self._pending_chunks: dict[str, set[int]] = defaultdict(set)
        self._chunk_deadline: float | None = None
        self.mqtt = MqttClient(MqttSettings(
            url=cfg.mqtt_url,
            client_id=f"fleet-server-{uuid.uuid4().hex[:8]}",
            will=Will(self.topics.server_status(), b"offline", retain=True),
        ))
        for leaf in ("hello", "status", "events", "chunkreq"):
            self.mqtt.subscribe(self.topics.all_devices(leaf))

    # -- loop ------------------------------------------------------------------------------
    def run(self, *, connect_timeout_s: float = 15.0) -> None:
        self.mqtt.start()
        self.mqtt.wait_connected(connect_timeout_s)
        log.info("server connected to %s", self.cfg.mqtt_url)
        next_reconcile = 0.0
        try:
            while not self.stop_event.is_set():
                timeout = 0.05 if self._chunk_deadline else 0.2
                try:
                    topic, payload = self.mqtt.inbox.get(timeout=timeout)
                    self.handle(topic, payload)
                except Exception as e:  # noqa: BLE001 - queue.Empty or a handler bug
                    if type(e).__name__ != "Empty":
                        log.exception("handler failed")
                now = time.monotonic()
                if self._chunk_deadline is not None and now >= self._chunk_deadline:
                    self.flush_chunks()
                if now >= next_reconcile:
                    self.reconcile()
                    next_reconcile = now + RECONCILE_EVERY_S
        finally:
            if self.mqtt.connected.is_set():
                self.mqtt.publish(self.topics.server_status(), b"offline", retain=True)
            self.mqtt.stop()
            self.deltas.shutdown()

    def handle(self, topic: str, payload: bytes) -> None:
        if topic == CONNECTED:
            self.mqtt.publish(self.topics.server_status(), b"online", retain=True)
            return
        if topic.startswith("$"):
            return
        self.stats.messages += 1
        try:
            device_id, leaf = self.topics.parse_dev(topic)
            if leaf == "hello":
                self.on_hello(device_id, decode(Hello, payload))
            elif leaf == "status":
                self.on_status(device_id, decode(Status, payload))
            elif leaf == "events":
                self.on_event(device_id, decode(Event, payload))
            elif leaf == "chunkreq":
                self.on_chunk_request(device_id, decode(ChunkRequest, payload))
        except WireError as e:
            self.stats.invalid_messages += 1
            log.warning("dropped invalid message on %s: %s", topic, e)

    # -- device messages -------------------------------------------------------------------
    @staticmethod
    def _same_device(topic_device: str, claimed: str) -> None:
        if topic_device != claimed:
            raise WireError(f"device {claimed} spoke on the topic of {topic_device}")

    def on_hello(self, device_id: str, hello: Hello) -> None:
        self._same_device(device_id, hello.device_id)
        resend: list[tuple[str, str]] = []
        with self.store.session() as s:
            registry.upsert_device_from_hello(s, hello, utcnow())
            running = {m.model: m.sha256 for m in hello.models}
            for t, model_name in self._open_targets(s, device_id):
                if t.target_sha256 and running.get(model_name) == t.target_sha256:
                    self._set_state(t, "healthy", "device already runs the target")
                elif t.state in IN_FLIGHT and t.manifest:
                    resend.append((model_name, t.manifest))
        for model_name, manifest in resend:
            self.mqtt.publish(self.topics.desired(device_id, model_name), manifest.encode(),
                              retain=True)

    def on_status(self, device_id: str, status: Status) -> None:
        self._same_device(device_id, status.device_id)
        with self.store.session() as s:
            registry.set_device_online(s, device_id, status.online, utcnow())

    def on_event(self, device_id: str, ev: Event) -> None:
        self._same_device(device_id, ev.device_id)
        with self.store.session() as s:
            target = None
            for t, model_name in self._open_targets(s, device_id):
                if model_name != ev.model:
                    continue
                if ev.manifest_id is None or t.manifest_id == ev.manifest_id:
                    target = t
            if ev.state in ("trial", "healthy", "rolled_back") and ev.sha256:
                registry.record_device_model(s, device_id, ev.model, ev.version, None,
                                             ev.sha256, utcnow())
            if target is None:
                return
            if ev.state in EVENT_ORDER:
                if EVENT_ORDER.get(target.state, 9) < EVENT_ORDER[ev.state]:
                    self._set_state(target, ev.state, "")
            else:
                self._set_state(target, ev.state, ev.reason)

    def on_chunk_request(self, device_id: str, req: ChunkRequest) -> None:
        self._same_device(device_id, req.device_id)
        if req.artifact_sha256 not in self._servable:
            log.warning("device %s asked for unknown artifact %s", device_id,
                        req.artifact_sha256[:12])
            return
        total = len(self._chunk_hashes[req.artifact_sha256])
        self._pending_chunks[req.artifact_sha256].update(i for i in req.indices if i < total)
        if self._chunk_deadline is None:
            self._chunk_deadline = time.monotonic() + CHUNK_WINDOW_S

    def flush_chunks(self) -> None:
        pending, self._pending_chunks = self._pending_chunks, defaultdict(set)
        self._chunk_deadline = None
        for sha, indices in pending.items():
            path = self.blobs.path(sha)
            for i in sorted(indices):
                data = read_chunk(path, i, self.cfg.chunk_size_bytes)
                self.mqtt.publish(self.topics.chunk(sha, i), data, qos=1)
                self.stats.chunks_published += 1
                self.stats.chunk_bytes_published += len(data)

    # -- reconciliation --------------------------------------------------------------------
    def _open_targets(self, s: Session, device_id: str) -> list[tuple[RolloutTarget, str]]:
        rows = s.execute(
            select(RolloutTarget, Model.name)
            .join(Rollout, Rollout.id == RolloutTarget.rollout_id)
            .join(Model, Model.id == Rollout.model_id)
            .where(RolloutTarget.device_id == device_id, Rollout.state == "running",
                   RolloutTarget.state.not_in(TERMINAL))
            .order_by(RolloutTarget.id)
        ).all()
        return [(t, name) for t, name in rows]

    def _set_state(self, t: RolloutTarget, state: str, reason: str) -> None:
        t.state = state
        t.reason = reason
        t.updated_at = utcnow()

    def reconcile(self) -> None:
        try:
            self._store_finished_deltas()
            publishes: list[tuple[str, bytes]] = []
            with self.store.session() as s:
                servable: set[str] = set()
                for r in s.scalars(select(Rollout).where(Rollout.state == "running")).all():
                    publishes += self._reconcile_rollout(s, r, servable)
                self._servable = servable
            for topic, manifest in publishes:
                self.mqtt.publish(topic, manifest, retain=True)
        except DeltafleetError as e:
            log.error("reconcile failed: %s", e)

    def _reconcile_rollout(self, s: Session, r: Rollout, servable: set[str]) -> list[tuple[str, bytes]]:
        model = s.get(Model, r.model_id)
        version = s.get(ModelVersion, r.version_id)
        group = s.get(Group, r.group_id)
        assert model and version and group
        targets = {t.device_id: t for t in s.scalars(
            select(RolloutTarget).where(RolloutTarget.rollout_id == r.id)).all()}
        for device in s.scalars(select(Device)).all():
            if device.id not in targets and registry.device_matches(device, group.selector):
                t = RolloutTarget(rollout_id=r.id, device_id=device.id, state="pending",
                                  reason="", updated_at=utcnow())
                s.add(t)
                targets[device.id] = t
        options = [
            VariantOption(v.id, v.name, v.format, v.precision, v.artifact_sha256, size)
            for v, size in s.execute(
                select(Variant, Artifact.size_bytes)
                .join(Artifact, Artifact.sha256 == Variant.artifact_sha256)
                .where(Variant.version_id == version.id)).all()
        ]
        out: list[tuple[str, bytes]] = []
        for t in targets.values():
            if t.state == "pending":
                published = self._plan_target(s, r, model, version, options, t)
                if published:
                    out.append(published)
            if t.state in IN_FLIGHT and t.artifact_sha256:
                servable.add(t.artifact_sha256)
                self._chunk_hashes_for(t.artifact_sha256)
        if targets and all(t.state in TERMINAL for t in targets.values()):
            ok = all(t.state in ("healthy", "skipped") for t in targets.values())
            r.state = "completed" if ok else "failed"
            r.finished_at = r.updated_at = utcnow()
            log.info("rollout %d %s", r.id, r.state)
        return out

    def _plan_target(self, s: Session, r: Rollout, model: Model, version: ModelVersion,
                     options: list[VariantOption], t: RolloutTarget) -> tuple[str, bytes] | None:
        device = s.get(Device, t.device_id)
        assert device is not None
        running = s.get(DeviceModel, (device.id, model.name))
        choice = choose_variant(device.runtimes or {}, running.variant if running else None,
                                options)
        if choice.variant is None:
            self._set_state(t, "skipped", choice.reason)
            return None
        v = choice.variant
        t.variant_id, t.target_sha256, t.full_bytes = v.variant_id, v.sha256, v.size_bytes
        if running is not None and running.sha256 == v.sha256:
            self._set_state(t, "healthy", "device already runs the target")
            return None
        base = running.sha256 if running is not None and self.blobs.has(running.sha256) else None
        kind, codec, artifact_sha, artifact_size = "full", "identity", v.sha256, v.size_bytes
        if base is not None:
            delta = s.scalar(select(Delta).where(Delta.base_sha256 == base,
                                                 Delta.target_sha256 == v.sha256))
            if delta is None and (base, v.sha256) not in self.deltas.failed:
                self.deltas.submit(base, self.blobs.path(base), v.sha256,
                                   self.blobs.path(v.sha256))
                t.reason = "building delta"
                return None  # stays pending until the delta is built
            if delta is not None and delta_worth_it(delta.size_bytes, v.size_bytes):
                kind, codec = "delta", delta.codec
                artifact_sha, artifact_size = delta.artifact_sha256, delta.size_bytes
        device.manifest_serial = (device.manifest_serial or 0) + 1
        now = int(time.time())
        manifest = Manifest(
            manifest_id=uuid.uuid4().hex,
            device_id=device.id,
            serial=device.manifest_serial,
            issued_at=now,
            expires_at=now + self.cfg.manifest_ttl_s,
            rollout_id=r.id,
            model=model.name,
            version=version.version,
            variant=v.name,
            format=v.format,
            target_sha256=v.sha256,
            target_size_bytes=v.size_bytes,
            base_sha256=base if kind == "delta" else (running.sha256 if running else None),
            artifact=ArtifactRef(kind, codec, artifact_sha, artifact_size,
                                 self.cfg.chunk_size_bytes, tuple(self._chunk_hashes_for(artifact_sha))),
        )
        signed = self.key.sign_bytes(manifest.to_wire())
        t.base_sha256 = manifest.base_sha256
        t.artifact_sha256, t.artifact_kind, t.bytes_to_send = artifact_sha, kind, artifact_size
        t.manifest_id, t.serial, t.manifest = manifest.manifest_id, manifest.serial, signed.decode()
        self._set_state(t, "notified", "")
        return self.topics.desired(device.id, model.name), signed

    def _chunk_hashes_for(self, sha: str) -> list[str]:
        hashes = self._chunk_hashes.get(sha)
        if hashes is None:
            hashes = chunk_hashes_file(self.blobs.path(sha), self.cfg.chunk_size_bytes)
            self._chunk_hashes[sha] = hashes
        return hashes

    def _store_finished_deltas(self) -> None:
        for built in self.deltas.finished():
            sha, size = self.blobs.put_file(built.path)
            Path(built.path).unlink(missing_ok=True)
            with self.store.session() as s:
                if s.get(Artifact, sha) is None:
                    s.add(Artifact(sha256=sha, size_bytes=size, kind="delta"))
                s.flush()
                s.add(Delta(base_sha256=built.base_sha256, target_sha256=built.target_sha256,
                            codec=built.codec, artifact_sha256=sha, size_bytes=size,
                            build_seconds=built.build_seconds))
            log.info("delta %s -> %s: %d bytes in %.1f s", built.base_sha256[:12],
                     built.target_sha256[:12], size, built.build_seconds)


