"""`fleetctl server`: MQTT handling, rollout reconciliation and delta building in one process.

State lives in SQL; the rollout logic is in ``controller.RolloutController`` (no I/O). This
module owns the I/O: it feeds device messages to the controller, publishes what it returns,
and serves artifact chunks. Device messages are untrusted: a message that does not validate
is logged and counted and causes no database write.

Chunk delivery: devices publish the indices they miss on their chunkreq topic; requests are
gathered for ``CHUNK_WINDOW_S`` and each requested chunk is published once on its
content-addressed topic, serving every device subscribed to it.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from deltafleet.shared import (
    ChunkRequest,
    DeltafleetError,
    Event,
    Hello,
    SigningKey,
    Status,
    Topics,
    WireError,
    decode,
    read_chunk,
)
from deltafleet.shared.mqtt import CONNECTED, MqttClient, MqttSettings, Will

from . import registry
from .config import ServerConfig
from .controller import Publish, RolloutController
from .deltas import DeltaBuilder
from .store import BlobStore, Store
from .store.models import Artifact, Delta

log = logging.getLogger(__name__)

CHUNK_WINDOW_S = 0.05
RECONCILE_EVERY_S = 0.5
SEEN_EVENTS_MAX = 100_000


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class ServerStats:
    messages: int = 0
    invalid_messages: int = 0
    duplicate_events: int = 0
    chunks_published: int = 0
    chunk_bytes_published: int = 0


class FleetServer:
    def __init__(self, cfg: ServerConfig, store: Store | None = None) -> None:
        self.cfg = cfg
        self.store = store or Store(cfg.db_url)
        self.blobs = BlobStore(cfg.blobs_dir)
        self.topics = Topics(cfg.topic_prefix)
        self.deltas = DeltaBuilder(cfg.home / "work")
        self.replica_id = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.controller = RolloutController(
            blobs=self.blobs, key=SigningKey.load(cfg.signing_key_path), topics=self.topics,
            deltas=self.deltas, chunk_size_bytes=cfg.chunk_size_bytes,
            manifest_ttl_s=cfg.manifest_ttl_s, owner=self.replica_id)
        self.stats = ServerStats()
        self.stop_event = threading.Event()
        self._servable: set[str] = set()
        self._chunk_totals: dict[str, int] = {}
        self._pending_chunks: dict[str, set[int]] = defaultdict(set)
        self._chunk_deadline: float | None = None
        self._seen_events: OrderedDict[str, None] = OrderedDict()
        self.mqtt = MqttClient(MqttSettings(
            url=cfg.mqtt_url,
            client_id=f"fleet-server-{uuid.uuid4().hex[:8]}",
            will=Will(self.topics.server_status(), b"offline", retain=True),
        ))
        # With FLEET_SHARE_GROUP set, replicas share device traffic: the broker hands each
        # message to one member of the shared subscription ($share works on MQTT 5 and, with
        # Mosquitto 2, on 3.1.1 too).
        share = os.environ.get("FLEET_SHARE_GROUP")
        for leaf in ("hello", "status", "events", "chunkreq"):
            topic = self.topics.all_devices(leaf)
            self.mqtt.subscribe(f"$share/{share}/{topic}" if share else topic)

    # -- loop ------------------------------------------------------------------------------
    def run(self, *, connect_timeout_s: float = 15.0) -> None:
        self.mqtt.start()
        self.mqtt.wait_connected(connect_timeout_s)
        log.info("server connected to %s", self.cfg.mqtt_url)
        next_reconcile = 0.0
        try:
            while not self.stop_event.is_set():
                timeout = CHUNK_WINDOW_S if self._chunk_deadline else 0.2
                try:
                    topic, payload = self.mqtt.inbox.get(timeout=timeout)
                except queue.Empty:
                    pass
                else:
                    try:
                        self.handle(topic, payload)
                    except DeltafleetError as e:
                        log.error("handling %s failed: %s", topic, e)
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

    def publish(self, items: list[Publish]) -> None:
        for p in items:
            self.mqtt.publish(p.topic, p.payload, retain=p.retain)

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
        with self.store.session() as s:
            resend = self.controller.on_hello(s, hello, utcnow())
        self.publish(resend)

    def on_status(self, device_id: str, status: Status) -> None:
        self._same_device(device_id, status.device_id)
        with self.store.session() as s:
            registry.set_device_online(s, device_id, status.online, utcnow())

    def on_event(self, device_id: str, ev: Event) -> None:
        self._same_device(device_id, ev.device_id)
        if ev.event_id in self._seen_events:
            self.stats.duplicate_events += 1
            return  # at-least-once delivery from the agent's outbox; apply each event once
        with self.store.session() as s:
            self.controller.on_event(s, ev, utcnow())
        self._seen_events[ev.event_id] = None
        if len(self._seen_events) > SEEN_EVENTS_MAX:
            self._seen_events.popitem(last=False)

    def on_chunk_request(self, device_id: str, req: ChunkRequest) -> None:
        self._same_device(device_id, req.device_id)
        total = self._chunk_totals.get(req.artifact_sha256)
        if req.artifact_sha256 not in self._servable or total is None:
            log.warning("device %s asked for unknown artifact %s", device_id,
                        req.artifact_sha256[:12])
            return
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
    def reconcile(self) -> None:
        try:
            self._store_finished_deltas()
            with self.store.session() as s:
                publishes, servable = self.controller.reconcile(s, utcnow())
            self._servable = servable
            for sha in servable:
                self._chunk_totals[sha] = len(self.controller.chunk_hashes(sha))
            self.publish(publishes)
        except DeltafleetError as e:
            log.error("reconcile failed: %s", e)

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
