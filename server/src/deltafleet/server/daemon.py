"""`fleetctl server`: MQTT handling, rollout reconciliation and delta building in one process.

State lives in SQL; the rollout logic is in ``controller.RolloutController`` (no I/O). This
module owns the I/O: it feeds device messages to the controller, publishes what it returns,
and serves artifact chunks. Device messages are untrusted: a message that does not validate
is logged and counted and causes no database write.

Device messages: ``inbox`` parses and checks each one and applies a batch in one
transaction. Chunk delivery: devices publish the indices they miss on their chunkreq topic;
the pure ``delivery.chunks.ChunkScheduler`` decides which chunks to publish and when (one
publish per chunk per round serves every device asking within the round's window; rounds of an
artifact start at most every ``cfg.chunk_round_s``), and ``delivery.publisher.ChunkPublisher``
reads each chunk from the blob store (``delivery.artifacts``) and publishes it on its
content-addressed topic. With
``cfg.chunk_retain`` every chunk is published retained, so devices asking late get it from the
broker and each chunk goes out once per rollout; after a reconnect to a broker that kept no
session (``session_present`` False) the broker may have lost them, and each goes out once more
to its first asker. The retained artifacts are listed durably (``delivery.retained``, under
``cfg.home``) and cleared ``cfg.chunk_retain_linger_s`` after no rollout serves them, also
across a restart. Its counters are in ``stats`` (``chunks_published``,
``chunk_bytes_published``, ``chunk_rounds``, ``chunks_cleared``) and per artifact in
``chunks.stats(sha)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError

from deltafleet.shared import ChunkRequest, DeltafleetError, Event, Hello, Topics, WireError
from deltafleet.shared.messages import MAX_EVENT_ID_CHARS
from deltafleet.shared.mqtt import CONNECTED, DISCONNECTED, MqttClient, Will

from . import bench_requests, fleet
from .config import ServerConfig, check_client_identity, mqtt_settings
from .controller import Publish, RolloutController
from .delivery.chunks import ChunkWindows
from .delivery.publisher import ChunkPublisher
from .deltas import DeltaBuilder
from .enroll import revoked_devices
from .fleet import portraits as fleet_portraits
from .guard import DeviceMessageGuard
from .inbox import (
    LEAVES,
    Applied,
    Batch,
    apply_resilient,
    drain,
    first_delivery,
    ids_by_device,
    parse_device_message,
    publish_acks,
)
from .ingest import UnstorableMessage
from .keys import online_signing_key, trust_publications
from .metrics import ServerMetrics, apply_telemetry
from .store import BlobStore, Store, StoreError
from .store.models import Artifact, Delta, DeviceEvent, utcnow

if TYPE_CHECKING:
    from .api.server import ApiServer

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 0.5
EVENT_IDS_KEPT_S = 7 * 86400  # how long applied event ids are remembered
PERSISTENT_SESSION_S = 7 * 86400
# After the first message of a batch, gather more for up to this long (never past the chunks'
# deadline): 10,000 devices' heartbeats arrive ~3 at a time, and a commit per handful cost
# most of the server's idle CPU.
BATCH_LINGER_S = 0.05
INBOX_UNACKED = 1000  # backpressure: QoS 1 messages the broker may have outstanding to us


@dataclass
class ServerStats:
    messages: int = 0
    invalid_messages: int = 0
    duplicate_events: int = 0
    acks_published: int = 0
    chunks_published: int = 0
    chunks_deduplicated: int = 0
    chunk_bytes_published: int = 0
    chunk_rounds: int = 0
    chunks_cleared: int = 0  # empty retained publishes of artifacts no longer served


class FleetServer:
    def __init__(self, cfg: ServerConfig, store: Store | None = None) -> None:
        self.cfg = cfg
        self.store = store or Store(cfg.db_url)
        self.blobs = BlobStore(cfg.blobs_dir)
        self.topics = Topics(cfg.topic_prefix)
        self.deltas = DeltaBuilder(cfg.home / "work")
        self.replica_id = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.controller = RolloutController(
            blobs=self.blobs, key=online_signing_key(cfg), topics=self.topics,
            deltas=self.deltas, chunk_size_bytes=cfg.chunk_size_bytes,
            manifest_ttl_s=cfg.manifest_ttl_s, owner=self.replica_id)
        self.stats = ServerStats()
        self.stop_event = threading.Event()
        self.artifacts = self.controller.artifacts
        self._next_prune = 0.0
        self._next_reconcile = 0.0
        self._next_auto_bench = 0.0
        self._revoked_cache: tuple[float, frozenset[str]] = (0.0, frozenset())
        self.guard = DeviceMessageGuard(is_denied=self._is_revoked)
        # cfg.server_id (FLEET_SERVER_ID: one per replica, stable across restarts, equal to the
        # replica's certificate identity) turns on a persistent session: the broker queues
        # device events for us while this replica is down.
        server_id = cfg.server_id
        settings = mqtt_settings(cfg, server_id or f"fleet-server-{uuid.uuid4().hex[:8]}",
                                 Will(self.topics.server_status(), b"offline", retain=True))
        if server_id:
            check_client_identity(settings)
        self.mqtt = MqttClient(dataclasses.replace(
            settings, max_unacked=INBOX_UNACKED,
            session_expiry_s=PERSISTENT_SESSION_S if server_id else None))
        # With a share group (a secret: cfg.share_group) replicas share device traffic: the
        # broker hands each message to one member of the shared subscription ($share works on
        # MQTT 5 and, with Mosquitto 2, on 3.1.1 too).
        self.metrics = ServerMetrics(self.store, guard=self.guard, stats=self.stats,
                                     connected=lambda: self.mqtt.connected.is_set(),
                                     backlog=lambda: self.mqtt.inbox.qsize())
        self.publisher = ChunkPublisher(
            artifacts=self.artifacts, topics=self.topics,
            windows=ChunkWindows(round_s=cfg.chunk_round_s, linger_s=cfg.chunk_retain_linger_s),
            retain=cfg.chunk_retain,
            retained_path=cfg.home / "chunks" / f"retained-{cfg.server_id or 'server'}.json",
            stats=self.stats, counters=self.metrics.counters, kind_of=self._artifact_kind,
            now=time.monotonic())
        self.chunks = self.publisher.scheduler  # the pure scheduler (tests read its stats)
        self.retained = self.publisher.retained
        share = cfg.share_group
        for leaf in LEAVES:
            topic = self.topics.all_devices(leaf)
            self.mqtt.subscribe(f"$share/{share}/{topic}" if share else topic)

    # -- loop ------------------------------------------------------------------------------
    def run(self, *, connect_timeout_s: float = 15.0) -> None:
        self.api: ApiServer | None = None
        if self.cfg.api_listen:  # the management API + console: uvicorn on a thread of its own
            from .api.server import ApiServer  # noqa: PLC0415

            self.api = ApiServer(self.cfg, self.store)
            self.api.start()
        if self.cfg.metrics_listen:
            self.metrics.serve(self.cfg.metrics_listen)
        self.mqtt.start()
        try:
            self.mqtt.wait_connected(connect_timeout_s)
        except BaseException:
            if self.api is not None:
                self.api.stop()
            raise
        log.info("server %s connected to %s", self.replica_id, self.cfg.mqtt_url)
        try:
            while not self.stop_event.is_set():
                try:
                    self._tick()
                except Exception:  # a bug must not end the server: log it, keep serving
                    log.exception("server loop step failed (retried next tick)")
        finally:
            if self.mqtt.connected.is_set():
                self.mqtt.publish(self.topics.server_status(), b"offline", retain=True)
            self.mqtt.stop()
            self.deltas.shutdown()
            if self.api is not None:
                self.api.stop()
            self.metrics.close()

    def _tick(self) -> None:
        """One loop step: apply a batch of device messages (waiting at most until chunks are
        due), publish the chunks due, and reconcile every RECONCILE_EVERY_S."""
        deadline = self.chunks.deadline
        wait = 0.2 if deadline is None else deadline - time.monotonic()
        batch = self._drain(min(0.2, max(0.005, wait)),
                            linger_s=min(BATCH_LINGER_S, max(0.0, wait)))
        if batch:
            try:
                self._handle_with_retry(batch)
            finally:
                self.mqtt.processed(len(batch))
        now = time.monotonic()
        self.flush_chunks(now)
        if now >= self._next_reconcile:
            self._next_reconcile = now + RECONCILE_EVERY_S
            self.reconcile()

    def _handle_with_retry(self, batch: list[tuple[str, bytes]]) -> None:
        """Validate every message (a bad one is refused alone, before any write), then apply
        the valid ones in one transaction; see ``_apply_resilient``."""
        items = self._validate(batch)
        if items:
            apply_resilient(self._apply, items, refuse=self._refuse,
                            database_errors=self.metrics.counters.database_errors)

    def _refuse(self, device_id: str, where: str, reason: str, kind: str) -> None:
        """Count one refused device message for its device, with its reason."""
        self.stats.invalid_messages += 1
        log.warning("refused a message from %s on %s (%s): %s", device_id or "?", where, kind,
                    reason)
        if device_id and self.guard.invalid(device_id, reason, time.monotonic(), kind=kind):
            log.error("device %s is now suspect: repeated invalid messages", device_id)

    def _drain(self, timeout_s: float, linger_s: float = 0.0) -> list[tuple[str, bytes]]:
        return drain(self.mqtt.inbox, timeout_s, linger_s)

    def publish(self, items: list[Publish]) -> None:
        for p in items:
            self.mqtt.publish(p.topic, p.payload, retain=p.retain)

    def handle(self, topic: str, payload: bytes) -> None:
        self.handle_batch([(topic, payload)])

    def handle_batch(self, batch: list[tuple[str, bytes]]) -> None:
        """Validate every message, then apply the valid ones in ONE database transaction
        (which raises if the database refuses it; the run loop uses ``_handle_with_retry``)."""
        items = self._validate(batch)
        if items:
            self._apply(items)

    def _validate(self, batch: list[tuple[str, bytes]]) -> list[tuple[str, Applied]]:
        """Parse and check every message against what the store can hold (``fits_store``)
        before any write; a message that fails is refused alone, counted for its device. Chunk
        requests are served from memory here. Returns the messages to apply, in order."""
        items: list[tuple[str, Applied]] = []
        for topic, payload in batch:
            if topic == CONNECTED:
                if not self.mqtt.session_present:
                    self.chunks.lost_retained()
                try:
                    for trust_topic, bundle in trust_publications(self.cfg):
                        self.mqtt.publish(trust_topic, bundle, retain=True)
                    self.mqtt.publish(self.topics.server_status(), b"online", retain=True)
                except (DeltafleetError, OSError) as e:
                    log.error("announcing the server after a (re)connect failed: %s", e)
                continue
            if topic == DISCONNECTED:
                self.metrics.counters.broker_disconnects += 1
                continue
            if topic.startswith("$"):
                continue
            self.stats.messages += 1
            device_id = ""
            try:
                device_id, _ = self.topics.parse_dev(topic)
                verdict = self.guard.admit(device_id, len(payload), time.monotonic())
                if not verdict.ok:
                    self.stats.invalid_messages += 1
                    log.warning("refused a message on %s: %s", topic, verdict.reason)
                    continue
                message = parse_device_message(self.topics, topic, payload)
                if isinstance(message, ChunkRequest):
                    self.on_chunk_request(device_id, message)
                else:
                    if isinstance(message, Hello):  # a (re)connect: earlier subscriptions gone
                        self.chunks.reconnected(device_id)
                    items.append((device_id, message))
                self.guard.valid(device_id)
            except WireError as e:
                self._refuse(device_id, topic, str(e),
                             "unstorable" if isinstance(e, UnstorableMessage) else "malformed")
            except Exception as e:  # a bug costs this one message (logged), never the server
                log.exception("device %s: unexpected error on a message on %s",
                              device_id or "?", topic)
                self._refuse(device_id, topic, f"unexpected error: {type(e).__name__}", "error")
        return items

    def _apply(self, items: list[tuple[str, Applied]]) -> None:
        """Apply validated messages in ONE database transaction (raises if it fails)."""
        b = Batch.of(items)
        hellos, events, telemetry, benches = b.hellos, b.events, b.telemetry, b.benches
        now = utcnow()
        with self.store.session() as s:
            fresh = first_delivery(s, events, now)
            resend = self.controller.on_hellos(s, hellos, now)
            # a hello also says "online"; a later status in the same batch may say otherwise
            fleet.set_devices_presence(
                s, {d: o for d, o in b.presence.items()
                    if d not in {h.device_id for h in hellos} or not o}, now)
            for ev in fresh:
                self.controller.on_event(s, ev, now)
            if telemetry or b.portraits or benches:
                s.flush()  # the devices of this batch's hellos exist now
            if telemetry:
                telemetry = apply_telemetry(s, telemetry, now)
            fleet_portraits.record_portraits(s, b.portraits, now)
            fleet_portraits.record_bench_results(s, benches, now)
        self.stats.duplicate_events += len(events) - len(fresh)  # counted once committed
        self.metrics.batch_messages.observe(len(items))
        stamp = time.time()
        for m in (*hellos, *events, *telemetry):
            self.metrics.lag.observe(max(0.0, stamp - (m.at if isinstance(m, Event) else
                                                       m.sent_at)))
        self.metrics.counters.telemetry_applied += len(telemetry)
        self.publish(resend)
        # After the commit, tell each device which of its outbox entries are recorded, one
        # ack per device and batch. Duplicates too: its outbox deletes only acked entries, so
        # one the broker accepted but lost (a crash, a server not subscribed yet) is sent
        # again, and a device's first ack may be lost.
        self.stats.acks_published += publish_acks(self.mqtt.publish, self.topics, ids_by_device([
            *((ev.device_id, ev.event_id) for ev in events
              if 0 < len(ev.event_id) <= MAX_EVENT_ID_CHARS),
            *((t.device_id, t.telemetry_id) for t in telemetry),
            *((m.device_id, m.result_id) for m in benches)]))

    def _is_revoked(self, device_id: str) -> bool:
        """Server-side deny list (`fleetctl device revoke`), re-read at most every 5 s."""
        stamp, revoked = self._revoked_cache
        if time.monotonic() - stamp > 5.0:
            revoked = frozenset(revoked_devices(self.cfg))
            self._revoked_cache = (time.monotonic(), revoked)
        return device_id in revoked

    # -- chunks ----------------------------------------------------------------------------
    def on_chunk_request(self, device_id: str, req: ChunkRequest) -> None:
        self.publisher.request(device_id, req, time.monotonic())

    def flush_chunks(self, now: float | None = None) -> None:
        self.publisher.flush(self.mqtt, time.monotonic() if now is None else now,
                             connected=self.mqtt.connected.is_set())

    def _artifact_kind(self, sha: str) -> str | None:
        """``delta`` or ``full`` (a model or its compressed form), from the artifacts table;
        None while the database cannot tell."""
        try:
            with self.store.read() as s:
                stored = s.scalar(select(Artifact.kind).where(Artifact.sha256 == sha))
        except SQLAlchemyError:
            return None
        return "delta" if stored == "delta" else "full"

    # -- reconciliation --------------------------------------------------------------------
    def reconcile(self) -> None:
        try:
            store_finished_deltas(self.deltas, self.blobs, self.store)
            if time.monotonic() >= self._next_prune:
                with self.store.session() as s:
                    s.execute(delete(DeviceEvent).where(
                        DeviceEvent.at < utcnow() - timedelta(seconds=EVENT_IDS_KEPT_S)))
                self._next_prune = time.monotonic() + 3600
            with self.store.session() as s:
                publishes, servable = self.controller.reconcile(s, utcnow())
            self.auto_bench()
            with self.store.session() as s:
                bench_publishes, bench_shas = bench_requests.due(
                    s, self.controller.key, self.artifacts, self.topics, utcnow())
            publishes = [*publishes, *bench_publishes]
            servable = {**dict.fromkeys(bench_shas, 0), **servable}
            self.publisher.serve(servable, time.monotonic())
            self.publish(publishes)
        except (DeltafleetError, SQLAlchemyError, OSError) as e:
            if isinstance(e, SQLAlchemyError | StoreError):
                self.metrics.counters.database_errors["reconcile"] += 1
            log.error("reconcile failed (retried next tick): %s", str(e).splitlines()[0])

    def auto_bench(self) -> None:
        """Every ``cfg.auto_bench_s`` (0: never) ask device types to benchmark the newest
        variants they have not measured (``bench_requests.auto_requests``), in a transaction
        of its own; a failure is logged and tried at the next sweep."""
        if self.cfg.auto_bench_s <= 0 or time.monotonic() < self._next_auto_bench:
            return
        self._next_auto_bench = time.monotonic() + self.cfg.auto_bench_s
        try:
            with self.store.session() as s:
                ids = bench_requests.auto_requests(s, utcnow())
            if ids:
                log.info("asked %d device(s) to benchmark new variants (automatic)", len(ids))
        except Exception:  # never fatal: rollouts and device messages go on
            log.exception("automatic benchmark sweep failed (tried again in %.0f s)",
                          self.cfg.auto_bench_s)


def store_finished_deltas(deltas: DeltaBuilder, blobs: BlobStore, store: Store) -> None:
    """Record the deltas the builder finished: each into the blob store and a Delta row."""
    for built in deltas.finished():
        sha, size = blobs.put_file(built.path)
        Path(built.path).unlink(missing_ok=True)
        with store.session() as s:
            if s.get(Artifact, sha) is None:
                s.add(Artifact(sha256=sha, size_bytes=size, kind="delta"))
            s.flush()
            s.add(Delta(base_sha256=built.base_sha256, target_sha256=built.target_sha256,
                        codec=built.codec, artifact_sha256=sha, size_bytes=size,
                        build_seconds=built.build_seconds))
        log.info("delta %s -> %s: %d bytes in %.1f s", built.base_sha256[:12],
                 built.target_sha256[:12], size, built.build_seconds)
