"""Fleet simulator: many simulated devices in one process, each with its own MQTT connection
to a real broker, speaking the real protocol through the project's own code (manifest
signature, device binding, expiry and serial checks via ``deltafleet.agent.update``; every
chunk and the whole artifact checked against the signed hashes; every artifact -- a full model,
zstd-compressed or as it is, or a delta -- decoded by the agent's own decoder and verified
against the target sha256). A model the fleet already holds (``SimFleet.model_cache``, like the
agent's previous model on disk) is installed without a download; clear it to make a rollback
download.

Knobs per device inject failures: ``fail_apply`` (report failed after download),
``fail_health`` (the trial fails: report rolled_back to the previous model), ``go_offline()`` /
``come_online()``, and ``relabel()`` (reconnect with new labels).

Used by the rollout tests and by the fleet-scale benchmarks.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from deltafleet.agent import codecs
from deltafleet.agent.errors import UpdateRejected
from deltafleet.agent.update import verify_manifest
from deltafleet.shared import (
    ChunkRequest,
    Event,
    Hello,
    Manifest,
    ModelState,
    Status,
    Topics,
    atomic_write_bytes,
    encode,
    load_public_key,
    sha256_bytes,
)
from deltafleet.shared.mqtt import CONNECTED, MqttClient, MqttSettings, Will

log = logging.getLogger(__name__)


@dataclass
class Knobs:
    fail_apply: bool = False
    fail_health: bool = False
    disk_full: bool = False  # report "waiting" (as the agent does) and go on once it is False


@dataclass
class Installed:
    version: str
    data: bytes
    sha256: str = ""

    def __post_init__(self) -> None:
        self.sha256 = self.sha256 or sha256_bytes(self.data)


@dataclass
class Received:
    manifest: Manifest
    at: float = field(default_factory=time.monotonic)


class SimDevice:
    def __init__(self, fleet: SimFleet, device_id: str, labels: dict[str, str],
                 models: dict[str, Installed]) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.labels = dict(labels)
        self.models = dict(models)  # model name -> what runs now
        self.previous: dict[str, Installed] = {}
        self.knobs = Knobs()
        self.runtimes = {"onnxruntime": "sim"}
        self.manifests: list[Received] = []  # every verified manifest, in arrival order
        self.events: list[Event] = []
        self.timeline: list[tuple[str, float]] = []  # (event state, monotonic time)
        self.rejections: list[str] = []
        self.last_serial = 0
        self._download: tuple[Manifest, dict[int, bytes]] | None = None
        self._waiting: Manifest | None = None  # a manifest put off for (simulated) disk space
        self._trial: tuple[Manifest, float] | None = None
        self._stop = threading.Event()
        self.client: MqttClient | None = None
        self._thread: threading.Thread | None = None

    # -- connection ------------------------------------------------------------------------
    def connect(self) -> None:
        t = self.fleet.topics
        self.client = MqttClient(MqttSettings(
            self.fleet.broker_url, f"sim-{self.device_id}-{uuid.uuid4().hex[:4]}",
            will=Will(t.status(self.device_id), encode(Status(self.device_id, False)))))
        self.client.subscribe(t.desired_filter(self.device_id))
        self.client.subscribe(t.server_status())
        self.client.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(self.client,), daemon=True)
        self._thread.start()

    def go_offline(self) -> None:
        if self.client is None:
            return
        client = self.client
        client.publish_wait(self.fleet.topics.status(self.device_id),
                            encode(Status(self.device_id, False)), retain=True)
        self._stop.set()
        client.stop()
        if self._thread:
            self._thread.join(5)
        self.client = None
        self._download = None

    def come_online(self) -> None:
        self.connect()

    def relabel(self, labels: dict[str, str]) -> None:
        self.labels = dict(labels)
        self.send_hello()

    @property
    def online(self) -> bool:
        return self.client is not None and self.client.connected.is_set()

    # -- protocol --------------------------------------------------------------------------
    def _loop(self, client: MqttClient) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = client.inbox.get(timeout=0.25)
            except queue.Empty:
                topic, payload = "", b""
            try:
                if topic:
                    self._handle(topic, payload)
                self._tick()
            except Exception:  # noqa: BLE001 - a simulator bug must not kill the fleet
                log.exception("sim device %s failed", self.device_id)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self.client is not None:
            self.client.publish(topic, payload, retain=retain)

    def send_hello(self) -> None:
        t = self.fleet.topics
        hello = Hello(self.device_id, "sim", {
            "arch": "x86_64", "os": "Linux sim", "cpu": "sim", "memory_bytes": 1 << 30,
            "accelerator": "none", "runtimes": dict(self.runtimes),
            "disk_free_bytes": 1 << 34}, self.labels,
            tuple(ModelState(name, m.version, m.sha256) for name, m in self.models.items()))
        self._publish(t.hello(self.device_id), encode(hello))

    def _handle(self, topic: str, payload: bytes) -> None:
        t = self.fleet.topics
        if topic == CONNECTED:
            self._publish(t.status(self.device_id), encode(Status(self.device_id, True)), True)
            self.send_hello()
            if self._download:
                self._request(self._download[0], self._download[1])
        elif topic == t.server_status():
            if payload == b"online":
                self.send_hello()
        elif topic.startswith(f"{t.prefix}/art/"):
            sha, index = t.parse_chunk(topic)
            self._on_chunk(sha, index, payload)
        elif "/desired/" in topic and payload:
            self._on_manifest(payload)

    def _report(self, m: Manifest, state: str, reason: str = "", sha: str | None = None) -> None:
        ev = Event(uuid.uuid4().hex, self.device_id, m.manifest_id, m.rollout_id, m.model,
                   m.version, state, reason, sha)
        self.events.append(ev)
        self.timeline.append((state, time.monotonic()))
        self._publish(self.fleet.topics.events(self.device_id), encode(ev))

    def _on_manifest(self, payload: bytes) -> None:
        try:
            m = verify_manifest(payload, self.fleet.trusted, device_id=self.device_id)
        except UpdateRejected as e:
            self.rejections.append(str(e))
            return
        current = self.models.get(m.model)
        if current is not None and current.sha256 == m.target_sha256:
            if m.serial > self.last_serial:
                self.last_serial = m.serial
                self.manifests.append(Received(m))
                self._report(m, "healthy", "already running", current.sha256)
            return
        if m.serial <= self.last_serial:
            return  # replay or re-delivery of what we already handled
        self.last_serial = m.serial
        self.manifests.append(Received(m))
        if m.artifact.kind == "delta" and (current is None or current.sha256 != m.base_sha256):
            self._report(m, "rejected", "base mismatch", current.sha256 if current else None)
            return
        if self.knobs.fail_apply:
            self._report(m, "failed", "injected apply failure",
                         current.sha256 if current else None)
            return
        if self.knobs.disk_full:
            self._waiting = m
            self._report(m, "waiting", "not enough disk (simulated): retrying when space is back",
                         current.sha256 if current else None)
            return
        self._start(m)

    def _start(self, m: Manifest) -> None:
        cached = self.fleet.model_cache.get(m.target_sha256)
        if cached is not None and m.artifact.kind == "full":  # e.g. rollback to previous
            self._install(m, cached)
            return
        self._download = (m, {})
        assert self.client is not None
        self.client.subscribe(self.fleet.topics.chunk_filter(m.artifact.sha256))
        self._report(m, "downloading")
        self._request(m, {})

    def _request(self, m: Manifest, have: dict[int, bytes]) -> None:
        missing = [i for i in range(len(m.artifact.chunks)) if i not in have]
        req = ChunkRequest(self.device_id, m.artifact.sha256, tuple(missing))
        self._publish(self.fleet.topics.chunk_request(self.device_id), encode(req))
        self._last_progress = time.monotonic()

    def _on_chunk(self, sha: str, index: int, data: bytes) -> None:
        if self._download is None or self._download[0].artifact.sha256 != sha:
            return
        m, have = self._download
        if index < len(m.artifact.chunks) and sha256_bytes(data) == m.artifact.chunks[index]:
            have[index] = data
            self._last_progress = time.monotonic()
        if len(have) == len(m.artifact.chunks):
            self._download = None
            assert self.client is not None
            self.client.unsubscribe(self.fleet.topics.chunk_filter(sha))
            artifact = b"".join(have[i] for i in range(len(have)))
            if sha256_bytes(artifact) != m.artifact.sha256:
                self._report(m, "failed", "artifact hash mismatch")
                return
            self._report(m, "applying")
            current = self.models.get(m.model)
            base = self.fleet.model_file(current) if current is not None else None
            try:  # the agent's own decoder, in-process (trusted test bytes: no child per
                # simulated device); every codec, target sha256 and size verified
                target = bytes(codecs.decode(m.artifact.codec, artifact, base,
                                             target_size=m.target_size_bytes))
                if sha256_bytes(target) != m.target_sha256:
                    raise UpdateRejected("target hash mismatch: patched model is not the "
                                         "signed target")
            except (UpdateRejected, codecs.CodecError) as e:
                reason = str(e)
                if isinstance(e, codecs.UnknownCodec):
                    reason = f"unknown codec {m.artifact.codec!r}"
                self._report(m, "failed", reason, current.sha256 if current else None)
                return
            self._install(m, target)

    def _install(self, m: Manifest, data: bytes) -> None:
        old = self.models.get(m.model)
        if old is not None:
            self.previous[m.model] = old
        self.models[m.model] = Installed(m.version, data, m.target_sha256)
        self.fleet.model_cache.setdefault(m.target_sha256, data)
        self._report(m, "trial", sha=m.target_sha256)
        self._trial = (m, time.monotonic() + m.trial_window_s)

    def _tick(self) -> None:
        if self._waiting is not None and not self.knobs.disk_full:
            m, self._waiting = self._waiting, None
            self._start(m)
        if self._download is not None and time.monotonic() - self._last_progress > 2.0:
            self._request(*self._download)
        if self._trial is not None and time.monotonic() >= self._trial[1]:
            m, _ = self._trial
            self._trial = None
            if self.knobs.fail_health:
                prev = self.previous.get(m.model)
                if prev is not None:
                    self.models[m.model] = prev
                self._report(m, "rolled_back", "injected health failure: error rate 40%",
                             prev.sha256 if prev else None)
            else:
                self._report(m, "healthy", sha=m.target_sha256)

    def stop(self) -> None:
        self._stop.set()
        if self.client is not None:
            self.client.stop()
        if self._thread is not None:
            self._thread.join(5)


class SimFleet:
    def __init__(self, broker_url: str, trusted_key: Path, *, prefix: str) -> None:
        self._files = tempfile.TemporaryDirectory(prefix="fleetsim-")
        self._files_lock = threading.Lock()
        self.broker_url = broker_url
        self.trusted = [load_public_key(trusted_key)]
        self.topics = Topics(prefix)
        self.devices: dict[str, SimDevice] = {}
        self.model_cache: dict[str, bytes] = {}

    def add(self, device_id: str, labels: dict[str, str],
            models: dict[str, Installed] | None = None) -> SimDevice:
        for m in (models or {}).values():
            self.model_cache.setdefault(m.sha256, m.data)
        dev = SimDevice(self, device_id, labels, models or {})
        self.devices[device_id] = dev
        dev.connect()
        return dev

    def wait_connected(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        for dev in self.devices.values():
            while not dev.online:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{dev.device_id} did not connect")
                time.sleep(0.02)

    def model_file(self, model: Installed) -> Path:
        """The model's bytes as a file (decoders read the base from disk), shared by devices."""
        path = Path(self._files.name) / model.sha256
        with self._files_lock:  # many device threads; a reader must never see a partial file
            if not path.exists():
                atomic_write_bytes(path, model.data)
        return path

    def close(self) -> None:
        for dev in self.devices.values():
            dev.stop()
        self._files.cleanup()
