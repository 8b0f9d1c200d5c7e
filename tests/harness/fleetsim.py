"""Fleet simulator: many simulated devices in one process, each with its own MQTT connection
to a real broker, each driving the agent's own ``UpdateMachine`` (``deltafleet.agent.machine``):
the same decisions, the same reports with the same stable event ids, only the I/O is simulated.
Manifests are verified with the agent's ``verify_manifest`` (signature, device binding, expiry,
serial); every chunk and the whole artifact are checked against the signed hashes; every
artifact -- a full model, zstd-compressed or as it is, or a delta -- is decoded by the agent's
own decoder (in-process: trusted test bytes, no child per device) and verified against the
target sha256. Chunks stay in memory; swap and trial pass at once (or as the knobs say). A
full model the fleet already holds (``SimFleet.model_cache``, like the agent's previous model
on disk) is installed without a download; clear it to make a rollback download, or set
``SimFleet.install_from_cache = False`` to make every device download (the benchmarks do).

Knobs per device inject failures: ``fail_apply`` (the downloaded artifact does not apply:
report failed), ``fail_health`` (the trial fails: roll back to the previous model),
``disk_full`` (too little disk: report ``waiting``, retried until it is False),
``go_offline()`` / ``come_online()``, and ``relabel()`` (reconnect with new labels).

Used by the rollout tests and by the fleet-scale benchmarks.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deltafleet import codecs
from deltafleet.agent import machine as mc
from deltafleet.agent.errors import UpdateRejected
from deltafleet.agent.reports import build_event, manifest_event, rejected_event
from deltafleet.agent.trial import Verdict
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
MACHINE = mc.MachineConfig(download_timeout_s=600.0, chunk_retry_s=2.0, disk_retry_s=0.5,
                           disk_margin_bytes=0, max_artifact_bytes=1 << 40)


@dataclass
class Knobs:
    fail_apply: bool = False
    apply_error: str = "injected apply failure"  # the reason a failed apply reports
    fail_health: bool = False
    disk_full: bool = False  # report "waiting" (as the agent does) and go on once it is False


@dataclass
class Installed:
    version: str
    data: bytes
    sha256: str = ""
    manifest_id: str | None = None
    variant: str = "default"  # reported in hello, as the agent reports its manifest's

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
        self.failed: dict[str, str] = {}  # model -> manifest id marked failed
        self.serials: dict[str, int] = {}  # model -> last serial seen
        self.knobs = Knobs()
        self.runtimes = {"onnxruntime": "sim"}
        self.manifests: list[Received] = []  # every verified manifest, in arrival order
        self.events: list[Event] = []
        self.timeline: list[tuple[str, float]] = []  # (event state, monotonic time)
        self.rejections: list[str] = []
        self.machine = mc.UpdateMachine(MACHINE)
        self._seen: set[str] = set()
        self._chunks: dict[str, tuple[Manifest, dict[int, bytes]]] = {}  # by model
        self._staged: dict[str, bytes] = {}
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
        for m in self.machine.downloading().values():  # a new client: subscribe again
            self.client.subscribe(t.chunk_filter(m.artifact.sha256))
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
                self.feed(mc.Tick(time.monotonic(), self.online))
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
            tuple(ModelState(name, m.version, m.sha256, m.variant)
                  for name, m in self.models.items()))
        self._publish(t.hello(self.device_id), encode(hello))

    def _handle(self, topic: str, payload: bytes) -> None:
        t = self.fleet.topics
        if topic == CONNECTED:
            self._publish(t.status(self.device_id), encode(Status(self.device_id, True)), True)
            self.send_hello()
            self.feed(mc.Connected(time.monotonic()))
        elif topic == t.server_status():
            if payload == b"online":
                self.send_hello()
        elif topic.startswith(f"{t.prefix}/art/"):
            sha, index = t.parse_chunk(topic)
            self._on_chunk(sha, index, payload)
        elif "/desired/" in topic and payload:
            self.feed(self._manifest_event(topic.rsplit("/", 1)[1], payload))
        elif "/desired/" in topic:  # cleared: withdrawn, as the agent takes it
            self.feed(mc.Withdrawn(topic.rsplit("/", 1)[1]))

    def _device(self, model: str) -> mc.Device:
        cur = self.models.get(model)
        return mc.Device(mc.Running(cur.sha256, cur.manifest_id) if cur else None,
                         self.failed.get(model))

    def _manifest_event(self, model: str, payload: bytes) -> Any:
        ev = manifest_event(
            self.machine, model, payload, self._device(model),
            lambda data, known: verify_manifest(data, self.fleet.trusted, device_id=self.device_id,
                                                last_serial=self.serials.get(model),
                                                known_ids=known))
        if isinstance(ev, mc.ManifestRejected):
            self.rejections.append(ev.reason)
            return ev
        m = ev.manifest
        if m.manifest_id not in self._seen:
            self._seen.add(m.manifest_id)
            self.manifests.append(Received(m))
        return ev

    def _on_chunk(self, sha: str, index: int, data: bytes) -> None:
        for model, (m, have) in list(self._chunks.items()):
            if m.artifact.sha256 != sha or index >= len(m.artifact.chunks) or index in have:
                continue
            if sha256_bytes(data) != m.artifact.chunks[index]:
                self.feed(mc.ChunkBad(model, m.manifest_id, index, time.monotonic()))
                continue
            have[index] = data
            self.feed(mc.ChunkAccepted(model, m.manifest_id, time.monotonic(), len(data)))
            if len(have) == len(m.artifact.chunks):
                self.feed(mc.DownloadComplete(model, m.manifest_id,
                                              sum(len(b) for b in have.values()), 0))

    # -- the machine's effects, simulated ----------------------------------------------------
    def feed(self, event: Any) -> None:
        skip: set[str] = set()
        for eff in self.machine.handle(event):
            if eff.model in skip:
                continue
            outcome = self._do(eff)
            if outcome is not None:
                if isinstance(outcome, mc.OutOfSpace):
                    skip.add(eff.model)
                self.feed(outcome)

    def _do(self, e: Any) -> Any:  # noqa: C901, PLR0911, PLR0912 - one branch per effect
        t, now = self.fleet.topics, time.monotonic()
        if isinstance(e, mc.Log):
            log.log(min(e.level, logging.INFO), "%s: %s", self.device_id, e.text)
        elif isinstance(e, mc.NoteSerial):
            self.serials[e.model] = max(e.serial, self.serials.get(e.model, 0))
            return mc.SerialNoted(e.model, e.manifest_id)
        elif isinstance(e, mc.Inspect):
            m = e.manifest
            cached = (self.fleet.install_from_cache and m.artifact.kind == "full"
                      and m.target_sha256 in self.fleet.model_cache)
            return mc.Inspected(e.model, m.manifest_id, cached, None,
                                0 if self.knobs.disk_full else 1 << 40, 0, 0, now)
        elif isinstance(e, mc.Adopt):
            self.models[e.model] = replace(self.models[e.model],
                                           manifest_id=e.manifest.manifest_id)
        elif isinstance(e, mc.Subscribe | mc.Unsubscribe) and self.client is not None:
            sub = self.client.subscribe if isinstance(e, mc.Subscribe) else self.client.unsubscribe
            sub(t.chunk_filter(e.sha256))
        elif isinstance(e, mc.OpenDownload):
            self._chunks[e.model] = (e.manifest, {})
            return mc.DownloadOpened(e.model, e.manifest.manifest_id, 0, 0, False, now)
        elif isinstance(e, mc.ForgetDownload):
            self._chunks.pop(e.model, None)
        elif isinstance(e, mc.RequestChunks):
            entry = self._chunks.get(e.model)
            if entry is not None and entry[0].artifact.sha256 == e.sha256:
                m, have = entry
                missing = e.indices if e.indices is not None else tuple(
                    i for i in range(len(m.artifact.chunks)) if i not in have)
                self._publish(t.chunk_request(self.device_id),
                              encode(ChunkRequest(self.device_id, e.sha256, missing, e.repair)))
        elif isinstance(e, mc.Apply):
            return self._apply(e.manifest)
        elif isinstance(e, mc.SwapIn):
            m = e.manifest
            data = self._staged.pop(e.model, None) or self.fleet.model_cache[m.target_sha256]
            if e.model in self.models:
                self.previous[e.model] = self.models[e.model]
            self.models[e.model] = Installed(m.version, data, m.target_sha256, m.manifest_id,
                                             m.variant)
            self.fleet.model_cache.setdefault(m.target_sha256, data)
            return mc.SwapDone(e.model, m.manifest_id)
        elif isinstance(e, mc.StartTrial):
            return mc.TrialReady(e.model, e.manifest.manifest_id, now)
        elif isinstance(e, mc.Judge):
            verdict = None
            if e.final:
                verdict = (Verdict(False, "injected health failure: error rate 40%", {})
                           if self.knobs.fail_health else Verdict(True, "within policy", {}))
            return mc.TrialVerdict(e.model, e.manifest_id, verdict)
        elif isinstance(e, mc.RollBack):
            prev = self.previous.get(e.model)
            if prev is not None:
                self.models[e.model] = prev
            self.failed[e.model] = e.manifest.manifest_id
            return mc.RolledBack(e.model, e.manifest.manifest_id, True,
                                 prev.sha256 if prev else None)
        elif isinstance(e, mc.MarkFailed):
            self.failed[e.model] = e.manifest_id
        elif isinstance(e, mc.Report):
            cur = self.models.get(e.model)
            self._send(build_event(self.device_id, e, cur.sha256 if cur else None))
        elif isinstance(e, mc.ReportRejected):
            cur = self.models.get(e.model)
            self._send(rejected_event(self.device_id, e.model, e.reason, e.raw,
                                      cur.sha256 if cur else None))
        elif isinstance(e, mc.Reconsider):
            self.feed(self._manifest_event(e.model, e.raw))
            return mc.Reconsidered(e.model, e.why, e.token)
        return None  # journal, chunk files, crash points: nothing to simulate

    def _apply(self, m: Manifest) -> Any:
        _, have = self._chunks.pop(m.model)
        artifact = b"".join(have[i] for i in range(len(have)))
        if sha256_bytes(artifact) != m.artifact.sha256:
            return mc.ApplyFailed(m.model, m.manifest_id, "artifact hash mismatch")
        if self.knobs.fail_apply:
            return mc.ApplyFailed(m.model, m.manifest_id, self.knobs.apply_error)
        current = self.models.get(m.model)
        base = self.fleet.model_file(current) if current is not None else None
        try:  # every codec, target sha256 and size verified
            target = bytes(codecs.decode(m.artifact.codec, artifact, base,
                                         target_size=m.target_size_bytes))
            if sha256_bytes(target) != m.target_sha256:
                raise UpdateRejected("target hash mismatch: patched model is not the "
                                     "signed target")
        except (UpdateRejected, codecs.CodecError) as e:
            reason = str(e)
            if isinstance(e, codecs.UnknownCodec):
                reason = f"unknown codec {m.artifact.codec!r}"
            return mc.ApplyFailed(m.model, m.manifest_id, reason)
        self._staged[m.model] = target
        return mc.Staged(m.model, m.manifest_id)

    def _send(self, ev: Event) -> None:
        self.events.append(ev)
        self.timeline.append((ev.state, time.monotonic()))
        self._publish(self.fleet.topics.events(self.device_id), encode(ev))

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
        self.install_from_cache = True

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
