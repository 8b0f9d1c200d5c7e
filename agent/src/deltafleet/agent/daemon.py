"""The agent's main loop: one thread consumes the MQTT inbox and drives updates.

Per model, the update moves through::

    idle -> downloading -> applying -> (load + smoke inference, activate) -> trial -> healthy
                  \\-------------\\---------------------------------> failed | rejected

Every failure leaves the running model untouched and is reported to the server.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from deltafleet.shared import (
    ChunkRequest,
    Event,
    Hello,
    Manifest,
    Status,
    Topics,
    encode,
    load_public_key,
    sha256_file,
)
from deltafleet.shared.mqtt import CONNECTED, DISCONNECTED, MqttClient, MqttSettings, Will

from .config import AgentConfig
from .errors import AgentError, ModelRuntimeError, UpdateRejected
from .runtime import LoadedModel, available_runtimes, load_model, smoke_test
from .store import InstalledModel, LocalStore
from .update import ChunkSet, apply_artifact, check_base, verify_manifest

log = logging.getLogger(__name__)
TICK_S = 0.25


def agent_version() -> str:
    try:
        return version("deltafleet-agent")
    except PackageNotFoundError:
        return "0+unknown"


def device_profile(cfg: AgentConfig) -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    hw = cfg.hardware_id
    if hw is None:
        try:
            hw = open("/etc/machine-id").read().strip() or None  # noqa: SIM115
        except OSError:
            hw = None
    return {
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": platform.processor() or platform.machine(),
        "memory_bytes": int(mem),
        "accelerator": cfg.accelerator,
        "runtimes": available_runtimes(),
        "disk_free_bytes": int(shutil.disk_usage(cfg.state_dir).free),
        "hardware_id": hw,
    }


@dataclass
class Trial:
    manifest: Manifest
    ends_at: float


@dataclass
class ActiveDownload:
    manifest: Manifest
    chunks: ChunkSet
    last_progress: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.topic_prefix)
        self.store = LocalStore(cfg.state_dir)
        self.trusted = [load_public_key(p) for p in cfg.trusted_keys]
        self.loaded: dict[str, LoadedModel] = {}
        self.downloads: dict[str, ActiveDownload] = {}  # by model name
        self.trials: dict[str, Trial] = {}  # by model name
        self.stop_event = threading.Event()
        self._crash_after = int(os.environ.get("FLEET_AGENT_CRASH_AFTER_CHUNKS", "0") or 0)
        self._chunks_this_run = 0
        offline = encode(Status(cfg.device_id, False))
        self.mqtt = MqttClient(MqttSettings(
            url=cfg.broker_url,
            client_id=f"fleet-agent-{cfg.device_id}",
            keepalive_s=cfg.keepalive_s,
            protocol=cfg.mqtt_protocol,
            will=Will(self.topics.status(cfg.device_id), offline, retain=True),
        ))

    # -- lifecycle -------------------------------------------------------------------------
    def load_installed(self) -> None:
        """Load every current model; a model that no longer loads falls back to previous."""
        for inst in self.store.all_current():
            try:
                self.loaded[inst.model] = self._load_verified(inst)
            except ModelRuntimeError as e:
                log.error("current model %s does not load: %s", inst.model, e)
                prev = self.store.previous(inst.model)
                if prev is not None:
                    self.loaded[inst.model] = self._load_verified(prev)
                    self.store.activate(prev)

    def _load_verified(self, inst: InstalledModel) -> LoadedModel:
        model = load_model(self.store.model_path(inst.sha256, inst.format), inst.format)
        smoke_test(model)
        return model

    def run(self) -> None:
        self.load_installed()
        self.mqtt.subscribe(self.topics.desired_filter(self.cfg.device_id))
        self.mqtt.subscribe(self.topics.server_status())
        self.mqtt.start()
        log.info("agent %s started; broker %s", self.cfg.device_id, self.cfg.broker_url)
        try:
            while not self.stop_event.is_set():
                try:
                    topic, payload = self.mqtt.inbox.get(timeout=TICK_S)
                except Exception:  # queue.Empty
                    topic, payload = "", b""
                if topic:
                    self.handle(topic, payload)
                self.tick()
        finally:
            if self.mqtt.connected.is_set():
                try:
                    self.mqtt.publish_wait(self.topics.status(self.cfg.device_id),
                                           encode(Status(self.cfg.device_id, False)),
                                           retain=True, timeout_s=2)
                except AgentError:
                    pass
                except Exception:  # noqa: BLE001 - best effort on shutdown
                    log.debug("could not publish offline status", exc_info=True)
            self.mqtt.stop()
            for m in self.loaded.values():
                m.close()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    # -- message handling ------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        if topic == CONNECTED:
            self.on_connected()
        elif topic == DISCONNECTED:
            log.warning("disconnected from broker; paho reconnects")
        elif topic == self.topics.server_status():
            if payload == b"online":
                self.send_hello()  # a (re)started server has not heard our hello yet
        elif topic.startswith(f"{self.topics.prefix}/art/"):
            sha, index = self.topics.parse_chunk(topic)
            self.on_chunk(sha, index, payload)
        elif topic.startswith(self.topics.dev(self.cfg.device_id, "desired") + "/"):
            model = topic.rsplit("/", 1)[1]
            if payload:
                self.on_manifest(model, payload)

    def on_connected(self) -> None:
        did = self.cfg.device_id
        self.mqtt.publish(self.topics.status(did), encode(Status(did, True)), retain=True)
        self.send_hello()
        for dl in self.downloads.values():
            self.request_missing(dl)

    def send_hello(self) -> None:
        did = self.cfg.device_id
        hello = Hello(
            device_id=did,
            agent_version=agent_version(),
            profile=device_profile(self.cfg),
            labels=dict(self.cfg.labels),
            models=tuple(m.as_state() for m in self.store.all_current()),
        )
        self.mqtt.publish(self.topics.hello(did), encode(hello))

    def on_manifest(self, model: str, payload: bytes) -> None:
        try:
            manifest = verify_manifest(payload, self.trusted, device_id=self.cfg.device_id,
                                       max_artifact_bytes=self.cfg.max_artifact_bytes)
            if manifest.model != model:
                raise UpdateRejected(f"manifest for {manifest.model} arrived on topic of {model}")
        except UpdateRejected as e:
            log.warning("rejected manifest for %s: %s", model, e)
            self.report_unverified(model, str(e))
            return
        current = self.store.current(model)
        if current is not None and current.sha256 == manifest.target_sha256:
            if current.manifest_id != manifest.manifest_id:
                self.store.activate(InstalledModel(
                    model, manifest.version, current.sha256, manifest.variant, manifest.format,
                    manifest.serial, manifest.manifest_id))
                self.report(manifest, "healthy", sha256=current.sha256, reason="already running")
            return
        if self.store.failed_manifest(model) == manifest.manifest_id:
            return  # already tried and reported; wait for a new manifest
        if manifest.serial <= self.store.last_serial:
            self.report(manifest, "rejected", reason=(
                f"replayed manifest: serial {manifest.serial} <= {self.store.last_serial}"))
            return
        active = self.downloads.get(model)
        if active is not None and active.manifest.manifest_id == manifest.manifest_id:
            return
        try:
            check_base(manifest, current)
        except UpdateRejected as e:
            self.fail(manifest, "rejected", str(e))
            return
        local = self.store.model_path(manifest.target_sha256, manifest.format)
        if local.exists() and sha256_file(local) == manifest.target_sha256:
            # e.g. a rollback to the previous model, which is still on disk: nothing to fetch
            self.report(manifest, "applying", reason="target already on disk")
            self.install(manifest, None, reused=0)
            return
        chunks = ChunkSet(manifest, self.store.download_dir(manifest.artifact.sha256))
        dl = ActiveDownload(manifest, chunks)
        self.downloads[model] = dl
        self.mqtt.subscribe(self.topics.chunk_filter(manifest.artifact.sha256))
        self.report(manifest, "downloading", chunks_reused=chunks.reused)
        if chunks.complete:
            self.finish(dl)
        else:
            self.request_missing(dl)

    def request_missing(self, dl: ActiveDownload, indices: list[int] | None = None) -> None:
        missing = indices if indices is not None else dl.chunks.missing()
        for start in range(0, len(missing), 1024):
            req = ChunkRequest(self.cfg.device_id, dl.manifest.artifact.sha256,
                               tuple(missing[start:start + 1024]))
            self.mqtt.publish(self.topics.chunk_request(self.cfg.device_id), encode(req))
        dl.last_progress = time.monotonic()

    def on_chunk(self, sha: str, index: int, data: bytes) -> None:
        for dl in list(self.downloads.values()):
            if dl.manifest.artifact.sha256 != sha:
                continue
            if dl.chunks.accept(index, data):
                dl.last_progress = time.monotonic()
                self._chunks_this_run += 1
                if self._crash_after and self._chunks_this_run >= self._crash_after:
                    os._exit(137)  # fault injection for tests: die mid-download
                if dl.chunks.complete:
                    self.finish(dl)
            elif index < dl.chunks.total and index not in dl.chunks.have:
                log.warning("chunk %d of %s failed its hash; re-requesting", index, sha[:12])
                self.request_missing(dl, [index])

    def tick(self) -> None:
        now = time.monotonic()
        for name, trial in list(self.trials.items()):
            if now >= trial.ends_at:
                del self.trials[name]
                self.report(trial.manifest, "healthy", sha256=trial.manifest.target_sha256)
        for dl in list(self.downloads.values()):
            if now - dl.started > self.cfg.download_timeout_s:
                self.fail(dl.manifest, "failed", "download timed out")
            elif now - dl.last_progress > self.cfg.chunk_retry_s and self.mqtt.connected.is_set():
                self.request_missing(dl)

    # -- apply -----------------------------------------------------------------------------
    def finish(self, dl: ActiveDownload) -> None:
        m = dl.manifest
        self.mqtt.unsubscribe(self.topics.chunk_filter(m.artifact.sha256))
        self.downloads.pop(m.model, None)
        self.report(m, "applying", bytes_received=dl.chunks.bytes_received(),
                    chunks_reused=dl.chunks.reused)
        self.install(m, dl.chunks, reused=dl.chunks.reused)

    def install(self, m: Manifest, chunks: ChunkSet | None, *, reused: int) -> None:
        """Patch (when ``chunks`` holds an artifact), stage, load, smoke-test, activate."""
        try:
            if chunks is not None:
                artifact = chunks.assemble()
                current = self.store.current(m.model)
                base = self.store.model_path(current.sha256, current.format) if current else None
                target = apply_artifact(m, artifact, base)
                path = self.store.stage(m.target_sha256, m.format, target)
            else:
                path = self.store.model_path(m.target_sha256, m.format)
            new_model = load_model(path, m.format)
            try:
                smoke_test(new_model)
            except ModelRuntimeError:
                new_model.close()
                raise
        except (UpdateRejected, ModelRuntimeError) as e:
            self.store.drop_download(m.artifact.sha256)
            self.fail(m, "failed", str(e))
            return
        self.store.activate(InstalledModel(m.model, m.version, m.target_sha256, m.variant,
                                           m.format, m.serial, m.manifest_id))
        old = self.loaded.get(m.model)
        self.loaded[m.model] = new_model
        if old is not None:
            old.close()
        self.store.drop_download(m.artifact.sha256)
        log.info("now running %s %s (%s)", m.model, m.version, m.target_sha256[:12])
        self.report(m, "trial", sha256=m.target_sha256,
                    bytes_received=m.artifact.size_bytes if chunks else 0, chunks_reused=reused)
        self.trials[m.model] = Trial(m, time.monotonic() + m.trial_window_s)
        if m.trial_window_s == 0:
            self.tick()

    def fail(self, m: Manifest, state: str, reason: str) -> None:
        log.warning("update of %s to %s %s: %s", m.model, m.version, state, reason)
        dl = self.downloads.pop(m.model, None)
        if dl is not None:
            self.mqtt.unsubscribe(self.topics.chunk_filter(m.artifact.sha256))
        self.store.mark_failed(m.model, m.manifest_id, m.serial)
        current = self.store.current(m.model)
        self.report(m, state, reason=reason, sha256=current.sha256 if current else None)

    # -- reporting -------------------------------------------------------------------------
    def report(self, m: Manifest, state: str, *, reason: str = "", sha256: str | None = None,
               bytes_received: int = 0, chunks_reused: int = 0) -> None:
        ev = Event(
            event_id=uuid.uuid4().hex, device_id=self.cfg.device_id, manifest_id=m.manifest_id,
            rollout_id=m.rollout_id, model=m.model, version=m.version, state=state,
            reason=reason, sha256=sha256, bytes_received=bytes_received,
            chunks_total=len(m.artifact.chunks), chunks_reused=chunks_reused,
        )
        self.mqtt.publish(self.topics.events(self.cfg.device_id), encode(ev))

    def report_unverified(self, model: str, reason: str) -> None:
        current = self.store.current(model)
        ev = Event(
            event_id=uuid.uuid4().hex, device_id=self.cfg.device_id, manifest_id=None,
            rollout_id=None, model=model, version="?", state="rejected", reason=reason,
            sha256=current.sha256 if current else None,
        )
        self.mqtt.publish(self.topics.events(self.cfg.device_id), encode(ev))
