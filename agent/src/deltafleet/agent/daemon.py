"""The agent's main loop: one thread consumes the MQTT inbox and drives updates; request
threads of the local API run inference concurrently (see ``serving``).

Per model, an update moves through (journal step in brackets, see ``journal``)::

    idle -> downloading [downloading] -> applying [patching -> staged]
         -> load + IO check + warm-up (off the request path)
         -> activate [activating: state.json + pointer flip] -> trial [trial]
         -> healthy [committing]            (trial within health_policy)
         -> rolled_back [rolling_back]      (breach: previous model back in service)
    any step before activation -> failed | rejected (the running model never changed)

Reports go through the on-disk outbox with stable event ids (one per manifest and state), so
they survive broker outages and restarts and the server can apply each one once. After a
restart the journal is reconciled before anything else: a half-done update resumes, finishes
its commit, or finishes its rollback by itself.

Trust: with ``root_of_trust`` the agent follows ``{prefix}/trust/keys`` (see ``trust``); a
manifest refused for its signature is kept and checked again after the next accepted trust
update, so a rotation and a manifest signed by the new key may arrive in either order. The
retained online status is re-published every ``heartbeat_s`` (the server's last_seen).

Fault injection for tests: FLEET_AGENT_CRASH_AT=<download|patch|stage|activate|trial|commit|
rollback> SIGKILLs the agent at that step; FLEET_AGENT_CRASH_AFTER_CHUNKS=N after N chunks.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from deltafleet.shared import (
    Ack,
    ChunkRequest,
    DeltafleetError,
    Event,
    Hello,
    Manifest,
    Status,
    Topics,
    decode,
    encode,
    parse_json_object,
    sha256_file,
    trust_topic,
)
from deltafleet.shared.messages import MAX_ACK_BYTES, MAX_HARDWARE_ID_CHARS
from deltafleet.shared.mqtt import CONNECTED, DISCONNECTED, MqttClient, MqttSettings, Will

from .codecs import ChunkSource, default_memory_cap_bytes
from .config import AgentConfig
from .errors import (
    AgentError,
    ArtifactRefused,
    DecodeLimitHit,
    ModelRuntimeError,
    NoSpace,
    SignatureRejected,
    UpdateRejected,
    is_no_space,
)
from .journal import Journal, Recovery, raw_manifest, reconcile
from .latency import sample_pairs
from .outbox import Outbox
from .runtime import LoadedModel, available_runtimes, load_model
from .serving import (
    Serving,
    Session,
    check_outputs,
    decode_golden,
    io_difference,
    io_signature,
    probe_feeds,
)
from .store import InstalledModel, LocalStore
from .trial import MIN_PAIRS, HealthPolicy, Verdict, evaluate
from .trust import RootTrust, open_trust
from .update import (
    MAX_MANIFEST_BYTES,
    ChunkSet,
    apply_to_file,
    check_base,
    check_disk,
    chunk_bytes_on_disk,
    space_needed,
    verify_manifest,
)

log = logging.getLogger(__name__)
TICK_S = 0.1
CRASH_STEPS = ("download", "patch", "stage", "activate", "trial", "commit", "rollback")
PROBE_BUDGET_S = 5.0
PAIR_BUDGET_S = 10.0  # longest the paired old/new latency probes of one trial take
API_RETRY_S = 30.0  # longest the agent spends on golden/zero probes for one measurement
MAX_DECODE_STARTS = 2  # decodes of one artifact the agent may die in before refusing it


def agent_version() -> str:
    try:
        return version("deltafleet-agent")
    except PackageNotFoundError:
        return "0+unknown"


def hardware_id(cfg: AgentConfig) -> str | None:
    """``cfg.hardware_id`` or /etc/machine-id, as reported in the hello and bound in manifests
    (at most the characters the server stores)."""
    hw = cfg.hardware_id
    if hw is None:
        try:
            hw = open("/etc/machine-id").read().strip() or None  # noqa: SIM115
        except OSError:
            hw = None
    return hw[:MAX_HARDWARE_ID_CHARS] if hw else None


def device_profile(cfg: AgentConfig) -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    hw = hardware_id(cfg)
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


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def event_id(device_id: str, manifest_id: str, state: str) -> str:
    """Stable per (device, manifest, state): a re-sent or re-made report has the same id."""
    return hashlib.sha256(f"{device_id}|{manifest_id}|{state}".encode()).hexdigest()[:32]


@dataclass
class Trial:
    manifest: Manifest
    session: Session
    policy: HealthPolicy
    ends_at: float  # monotonic
    previous: InstalledModel | None
    golden: list[Any] = field(default_factory=list)
    partner: Session | None = None  # the previous version, kept loaded for paired probes
    unjudged: str = ""  # why latency cannot be judged although the policy asks for it


@dataclass
class ActiveDownload:
    manifest: Manifest
    chunks: ChunkSet
    raw: bytes
    last_progress: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)


@dataclass
class SpaceWait:
    """A manifest held back for disk space (refused before its download, or ENOSPC/EDQUOT
    during it): tried again at ``retry_at``; its verified chunks stay on disk."""
    manifest_id: str
    artifact_sha256: str
    raw: bytes
    retry_at: float  # monotonic


class _MqttPublisher:
    def __init__(self, mqtt: MqttClient) -> None:
        self.mqtt = mqtt

    def is_connected(self) -> bool:
        return self.mqtt.connected.is_set()

    def publish_acked(self, topic: str, payload: bytes, timeout_s: float) -> None:
        self.mqtt.publish_wait(topic, payload, qos=1, timeout_s=timeout_s)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.topic_prefix)
        self.store = LocalStore(cfg.state_dir)
        self.journal = Journal(Path(cfg.state_dir) / "journal")
        self.trust = open_trust(cfg, int(time.time()))
        self.hardware_id = hardware_id(cfg)
        self.unverified: dict[str, bytes] = {}  # by model: refused for its signature; retried
        self.recovering: set[str] = set()  # manifest ids of journal records being recovered
        self._last_heartbeat = 0.0
        self.serving = Serving(results_size=cfg.results_cache_size,
                               hold_timeout_s=cfg.hold_timeout_s)
        self.defaults = HealthPolicy(cfg.trial_max_error_rate_ppm, cfg.trial_max_p95_ratio_pct,
                                     cfg.trial_min_requests, cfg.trial_p95_slack_us)
        self.downloads: dict[str, ActiveDownload] = {}  # by model name
        self.trials: dict[str, Trial] = {}  # by model name
        self.pending: dict[str, tuple[str, bytes]] = {}  # (id, manifest) arriving in a trial
        self.waiting: dict[str, SpaceWait] = {}  # by model: held back for disk space
        self.unsaved: dict[str, tuple[str, bytes]] = {}  # reports the outbox could not store
        self._unsaved_retry_at = 0.0
        self._journal_behind: set[str] = set()  # models whose journal missed a step (ENOSPC)
        self._space_reported: set[tuple[str, str]] = set()  # (manifest id, id key) said once
        self.stop_event = threading.Event()
        self._crash_after = int(os.environ.get("FLEET_AGENT_CRASH_AFTER_CHUNKS", "0") or 0)
        self._crash_at = os.environ.get("FLEET_AGENT_CRASH_AT", "")
        self._chunks_this_run = 0
        offline = encode(Status(cfg.device_id, False))
        self.mqtt = MqttClient(MqttSettings(
            url=cfg.broker_url,
            client_id=cfg.device_id,  # = certificate CN, which the broker enforces anyway
            keepalive_s=cfg.keepalive_s,
            protocol=cfg.mqtt_protocol,
            will=Will(self.topics.status(cfg.device_id), offline, retain=True),
            ca_file=str(cfg.mqtt_ca_file) if cfg.mqtt_ca_file else None,
            cert_file=str(cfg.mqtt_cert_file) if cfg.mqtt_cert_file else None,
            key_file=str(cfg.mqtt_key_file) if cfg.mqtt_key_file else None,
        ))
        self.outbox = Outbox(Path(cfg.state_dir) / "outbox", _MqttPublisher(self.mqtt),
                             base_backoff_s=cfg.outbox_backoff_min_s,
                             max_backoff_s=cfg.outbox_backoff_max_s,
                             max_messages=cfg.outbox_max_messages,
                             resend_after_s=cfg.outbox_resend_after_s,
                             max_resend_s=cfg.outbox_resend_max_s)
        self.api: Any = None
        self._api_retry_at: float | None = 0.0 if cfg.api_port else None

    def _crash_point(self, step: str) -> None:
        if self._crash_at == step:
            log.warning("fault injection: SIGKILL at %s", step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    # -- lifecycle -------------------------------------------------------------------------
    def load_installed(self) -> None:
        """Load every current model (hash-checked); one that does not load falls back to the
        previous model. Configured fallback models are loaded beside them."""
        self.store.clean_temp_files()
        for name, path in self.cfg.fallback_models.items():
            try:
                self.serving.set_fallback(name, Path(path))
            except ModelRuntimeError as e:
                log.error("fallback model for %s does not load: %s", name, e)
        for inst in self.store.all_current():
            try:
                model = self._load_verified(inst)
            except ModelRuntimeError as e:
                log.error("current model %s does not load: %s", inst.model, e)
                prev = self.store.previous(inst.model)
                if prev is None:
                    continue
                model = self._load_verified(prev)
                self.store.rollback(inst.model, inst.manifest_id)
                inst = prev
            self.serving.install(inst.model, model, inst.version, inst.sha256)

    def _load_verified(self, inst: InstalledModel) -> LoadedModel:
        path = self.store.model_path(inst.sha256, inst.format)
        if not path.is_file() or sha256_file(path) != inst.sha256:
            raise ModelRuntimeError(f"{path.name} is missing or does not match its sha256")
        model = load_model(path, inst.format)
        try:
            self._warm_up(model, [])
        except ModelRuntimeError:
            model.close()
            raise
        return model

    def run(self) -> None:
        plans = self.plan_recovery()
        self.load_installed()
        self.recover(plans)
        _freeze_heap()
        self._start_api()
        if isinstance(self.trust, RootTrust):  # before desired/: keys first where possible
            self.mqtt.subscribe(trust_topic(self.topics.prefix))
        self.mqtt.subscribe(self.topics.desired_filter(self.cfg.device_id))
        self.mqtt.subscribe(self.topics.server_status())
        self.mqtt.subscribe(self.topics.ack(self.cfg.device_id))
        self.mqtt.start()
        self.outbox.start()
        log.info("agent %s started; broker %s", self.cfg.device_id, self.cfg.broker_url)
        try:
            while not self.stop_event.is_set():
                try:
                    topic, payload = self.mqtt.inbox.get(timeout=TICK_S)
                except Exception:  # queue.Empty
                    topic, payload = "", b""
                try:
                    if topic:
                        self.handle(topic, payload)
                    self.tick()
                except OSError as e:
                    if not is_no_space(e):
                        raise
                    log.error("disk full (%s) while handling %s; going on (inference and the "
                              "broker connection are not affected), retrying later",
                              e.strerror, topic or "a tick")
        finally:
            if self.api is not None:
                self.api.stop()
            self.outbox.stop()
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
            self.serving.close()

    def _start_api(self) -> None:
        """Serve the local API; a port in use is logged and retried, never fatal (updates and
        reports go on without it)."""
        if self._api_retry_at is None or time.monotonic() < self._api_retry_at:
            return
        from .api import InferenceApi

        try:
            self.api = InferenceApi(self.serving, self.describe, self.cfg.api_host,
                                    self.cfg.api_port)
        except OSError as e:
            log.error("local inference API cannot listen on %s:%d (%s); retrying in %.0f s",
                      self.cfg.api_host, self.cfg.api_port, e, API_RETRY_S)
            self._api_retry_at = time.monotonic() + API_RETRY_S
            return
        self._api_retry_at = None
        # Request threads get the GIL back within 1 ms while the agent thread loads, hashes or
        # warms a model (default 5 ms), which keeps the swap-time p99 down.
        sys.setswitchinterval(0.001)
        self.api.start()
        log.info("local inference API on http://%s:%d", self.cfg.api_host, self.api.port)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    # -- crash recovery --------------------------------------------------------------------
    def plan_recovery(self) -> list[tuple[Manifest, dict[str, Any], Recovery]]:
        """Before any model is loaded: decide what each journal record needs and make the
        decisions durable that must hold even if loading crashes the agent again (a trial
        restart is counted; a rollback switches state.json back to the previous model)."""
        plans = []
        for model, rec in self.journal.all().items():
            current = self.store.current(model)
            try:  # our own journal of a manifest accepted before: expiry and serial are done
                m = verify_manifest(raw_manifest(rec), self.trust, device_id=self.cfg.device_id,
                                    hardware_id=self.hardware_id, check_expiry=False)
            except UpdateRejected as e:
                log.error("journal of %s holds an unusable manifest (%s); dropping it", model, e)
                self.journal.clear(model)
                continue
            on_disk = self.store.model_path(m.target_sha256, m.format).is_file()
            decision = reconcile(rec, current.sha256 if current else None, on_disk,
                                 max_trial_restarts=self.cfg.max_trial_restarts)
            log.warning("recovering %s from journal step %s: %s (%s)", model, rec["step"],
                        decision.action, decision.reason)
            if decision.action == "resume_trial" and rec["step"] == "trial":
                trial = dict(rec.get("trial") or {})
                trial["restarts"] = int(trial.get("restarts", 0)) + 1
                try:
                    rec = self.journal.advance(model, "trial", trial=trial)
                except OSError as e:
                    if not is_no_space(e):
                        raise
                    # a restart that cannot be counted could loop: go back to the old model
                    decision = Recovery("finish_rollback", "disk full: the restart during the "
                                        "trial cannot be counted")
                    log.error("%s: %s", model, decision.reason)
            if decision.action == "finish_rollback":
                if rec["step"] != "rolling_back":
                    verdict = rec.get("verdict") or {"reason": decision.reason, "figures": {}}
                    rec = self._advance_soft(model, "rolling_back", verdict=verdict) or dict(
                        rec, verdict=verdict)
                if current is not None and current.sha256 == m.target_sha256:
                    # never load the failed model (if state.json cannot be written, it is
                    # loaded, then swapped out again by the rollback in recover())
                    self._soft("roll state.json back", self.store.rollback, model, m.manifest_id)
            self.recovering.add(m.manifest_id)
            plans.append((m, rec, decision))
        return plans

    def recover(self, plans: list[tuple[Manifest, dict[str, Any], Recovery]]) -> None:
        """After the current models are loaded: carry out each record's recovery."""
        for m, rec, decision in plans:
            model = m.model
            if decision.action == "redo":
                self.journal.clear(model)
                self.on_manifest(model, raw_manifest(rec))
            elif decision.action == "resume_trial":
                trial = rec.get("trial") or {}
                previous = self.store.previous(model)
                if rec["step"] == "activating" or not trial:
                    window = float(m.trial_window_s)
                    self.journal.advance(model, "trial", trial={
                        "ends_at": time.time() + window, "restarts": 0})
                    self.report(m, "trial", sha256=m.target_sha256)
                    self._start_trial(m, previous, window)
                else:
                    remaining = max(0.0, min(float(m.trial_window_s),
                                             float(trial.get("ends_at", 0)) - time.time()))
                    self._start_trial(m, previous, remaining)
            elif decision.action == "finish_commit":
                self._commit(m, Verdict(True, "committed after restart",
                                        rec.get("verdict", {}).get("figures", {})))
            elif decision.action == "finish_rollback":
                verdict = rec.get("verdict") or {"reason": decision.reason, "figures": {}}
                self._roll_back(m, Verdict(False, verdict["reason"], verdict.get("figures", {})))
            else:
                self.journal.clear(model)
        self.recovering.clear()
        self._clean_downloads()

    # -- message handling ------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        if topic == CONNECTED:
            self.on_connected()
        elif topic == DISCONNECTED:
            log.warning("disconnected from broker; paho reconnects, reports wait in the outbox")
        elif topic == trust_topic(self.topics.prefix) and isinstance(self.trust, RootTrust):
            self.on_trust(payload)
        elif topic == self.topics.ack(self.cfg.device_id):
            self.on_ack(payload)
        elif topic == self.topics.server_status():
            if payload == b"online":
                self.send_hello()  # a (re)started server has not heard our hello yet
                self.outbox.resend_all()  # nor, maybe, the reports sent while it was away
        elif topic.startswith(f"{self.topics.prefix}/art/"):
            sha, index = self.topics.parse_chunk(topic)
            self.on_chunk(sha, index, payload)
        elif topic.startswith(self.topics.dev(self.cfg.device_id, "desired") + "/"):
            model = topic.rsplit("/", 1)[1]
            if payload:
                self.on_manifest(model, payload)

    def on_trust(self, payload: bytes) -> None:
        """A trust bundle (root chain + key list): apply, persist, re-check held manifests."""
        assert isinstance(self.trust, RootTrust)
        try:
            changed = self.trust.apply(payload, int(time.time()))
        except UpdateRejected as e:
            log.error("%s; keeping root v%d", e, self.trust.store.root.version)
            return
        if changed:
            for model, held in list(self.unverified.items()):
                del self.unverified[model]
                self.on_manifest(model, held)

    def on_ack(self, payload: bytes) -> None:
        """The server committed these events: only now do they leave the outbox."""
        try:
            ack = decode(Ack, payload, max_bytes=MAX_ACK_BYTES)
            if ack.device_id != self.cfg.device_id:
                raise DeltafleetError(f"ack for device {ack.device_id} on our topic")
        except DeltafleetError as e:
            log.warning("ignoring an invalid ack: %s", e)
            return
        self.outbox.ack(ack.event_ids)

    def publish_status(self) -> None:
        did = self.cfg.device_id
        self.mqtt.publish(self.topics.status(did), encode(Status(did, True)), retain=True)
        self._last_heartbeat = time.monotonic()

    def on_connected(self) -> None:
        self.publish_status()
        self.send_hello()
        self.outbox.resend_all()  # what the broker took before may be lost: send it again
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

    def known_manifest_ids(self, model: str) -> set[str]:
        """The manifests of ``model`` this device holds right now (running, failed, being
        downloaded, in trial, waiting for a trial, in recovery): seeing one again is a
        re-delivery, not a replay. A manifest superseded by a newer one is not in here."""
        ids = set(self.recovering)
        current = self.store.current(model)
        failed = self.store.failed_manifest(model)
        ids.update(i for i in (current.manifest_id if current else None, failed) if i)
        if model in self.downloads:
            ids.add(self.downloads[model].manifest.manifest_id)
        if model in self.trials:
            ids.add(self.trials[model].manifest.manifest_id)
        if model in self.pending:
            ids.add(self.pending[model][0])
        if model in self.waiting:
            ids.add(self.waiting[model].manifest_id)
        return ids

    def on_manifest(self, model: str, payload: bytes) -> None:
        """Verify (update.verify_manifest, steps 1-5), then act; see update for the order."""
        try:
            manifest = verify_manifest(
                payload, self.trust, device_id=self.cfg.device_id,
                hardware_id=self.hardware_id, last_serial=self.store.last_serial_of(model),
                known_ids=self.known_manifest_ids(model))
            if manifest.model != model:
                raise UpdateRejected(f"manifest for {manifest.model} arrived on topic of {model}")
        except UpdateRejected as e:
            if isinstance(e, SignatureRejected) and isinstance(self.trust, RootTrust):
                self.unverified[model] = payload  # maybe signed by a key not yet received
            if _claimed_manifest_id(payload) in self.known_manifest_ids(model):
                # The manifest already accepted, re-delivered (retained) after it expired or
                # its key was rotated out: nothing to do and nothing new to report.
                log.info("ignoring re-delivered manifest for %s: %s", model, e)
                return
            log.warning("rejected manifest for %s: %s", model, e)
            self.report_unverified(model, str(e), payload)
            return
        self.unverified.pop(model, None)
        waiting = self.waiting.pop(model, None)  # retried now, or superseded by this one
        if waiting is not None and waiting.artifact_sha256 != manifest.artifact.sha256:
            self.store.drop_download(waiting.artifact_sha256)
        try:
            self.store.note_serial(model, manifest.serial)  # no-op for a re-delivery
        except OSError as e:
            if not is_no_space(e):
                raise
            self._wait_for_space(manifest, payload, f"disk full recording the manifest serial "
                                 f"({e.strerror}); retrying when space is back", "start")
            return
        trial = self.trials.get(model)
        if trial is not None:
            if trial.manifest.manifest_id != manifest.manifest_id:
                self.pending[model] = (manifest.manifest_id, payload)  # after the trial
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
        active = self.downloads.get(model)
        if active is not None:
            if active.manifest.manifest_id == manifest.manifest_id:
                return
            log.info("manifest %s supersedes download of %s", manifest.manifest_id,
                     active.manifest.manifest_id)
            self.downloads.pop(model)
            self.mqtt.unsubscribe(self.topics.chunk_filter(active.manifest.artifact.sha256))
            if active.manifest.artifact.sha256 != manifest.artifact.sha256:
                self.store.drop_download(active.manifest.artifact.sha256)
        local = self.store.model_path(manifest.target_sha256, manifest.format)
        on_disk = local.exists() and sha256_file(local) == manifest.target_sha256
        if not on_disk:
            refusal = self.store.artifact_refusal(manifest.artifact.sha256, self._decode_limits())
            if refusal is not None:  # refused before (maybe under another manifest): final
                self.fail(manifest, "failed", f"artifact refused earlier, not decoded again: "
                                              f"{refusal}")
                return
        try:
            check_base(manifest, current)
            if not on_disk:
                self._check_space(manifest)
        except NoSpace as e:
            self._wait_for_space(manifest, payload, str(e), "start")
            return
        except UpdateRejected as e:
            self.fail(manifest, "rejected", str(e))
            return
        prev_sha = current.sha256 if current else None
        try:
            self.journal.begin(model, "staged" if on_disk else "downloading", payload,
                               manifest.manifest_id, manifest.target_sha256, prev_sha)
            if not on_disk:
                chunks = ChunkSet(manifest, self.store.download_dir(manifest.artifact.sha256))
        except OSError as e:
            if not is_no_space(e):
                raise
            self._wait_for_space(manifest, payload, f"disk full starting the update "
                                 f"({e.strerror}); retrying when space is back", "start")
            return
        if on_disk:
            # e.g. a rollback to the previous model, which is still on disk: nothing to fetch
            self.report(manifest, "applying", reason="target already on disk")
            self.install(manifest, None, reused=0, raw=payload)
            return
        dl = ActiveDownload(manifest, chunks, payload)
        self.downloads[model] = dl
        self.mqtt.subscribe(self.topics.chunk_filter(manifest.artifact.sha256))
        self.report(manifest, "downloading", chunks_reused=chunks.reused)
        if chunks.complete:
            self.finish(dl)
        else:
            self.request_missing(dl)

    def request_missing(self, dl: ActiveDownload, indices: list[int] | None = None) -> None:
        """Ask for chunks; explicit ``indices`` are repairs (a copy arrived and failed its
        hash), which the server answers even if it published them a moment ago."""
        missing = indices if indices is not None else dl.chunks.missing()
        for start in range(0, len(missing), 1024):
            req = ChunkRequest(self.cfg.device_id, dl.manifest.artifact.sha256,
                               tuple(missing[start:start + 1024]), repair=indices is not None)
            self.mqtt.publish(self.topics.chunk_request(self.cfg.device_id), encode(req))
        dl.last_progress = time.monotonic()

    def on_chunk(self, sha: str, index: int, data: bytes) -> None:
        for dl in list(self.downloads.values()):
            if dl.manifest.artifact.sha256 != sha:
                continue
            try:
                accepted = dl.chunks.accept(index, data)
            except NoSpace as e:
                self._pause_download(dl, str(e))
                return
            if accepted:
                dl.last_progress = time.monotonic()
                self._chunks_this_run += 1
                if self._crash_after and self._chunks_this_run >= self._crash_after:
                    os._exit(137)  # fault injection for tests: die mid-download
                if self._chunks_this_run == 2 or dl.chunks.total < 2:
                    self._crash_point("download")
                if dl.chunks.complete:
                    self.finish(dl)
            elif index < dl.chunks.total and index not in dl.chunks.have:
                log.warning("chunk %d of %s failed its hash; re-requesting", index, sha[:12])
                self.request_missing(dl, [index])

    def tick(self) -> None:
        now = time.monotonic()
        if self._api_retry_at is not None:
            self._start_api()
        if (self.cfg.heartbeat_s and now - self._last_heartbeat >= self.cfg.heartbeat_s
                and self.mqtt.connected.is_set()):
            self.publish_status()
        for name, trial in list(self.trials.items()):
            self._judge(name, trial, final=now >= trial.ends_at)
        for dl in list(self.downloads.values()):
            if now - dl.started > self.cfg.download_timeout_s:
                self.journal.clear(dl.manifest.model)
                self.fail(dl.manifest, "failed", "download timed out")
            elif now - dl.last_progress > self.cfg.chunk_retry_s and self.mqtt.connected.is_set():
                self.request_missing(dl)
        if self.unsaved and now >= self._unsaved_retry_at:
            self._store_unsaved()
        for name, wait in list(self.waiting.items()):
            if now >= wait.retry_at:
                self.on_manifest(name, wait.raw)
                if self.waiting.get(name) is wait:  # refused on its own now (e.g. expired)
                    log.warning("giving up on manifest %s of %s held for disk space",
                                wait.manifest_id, name)
                    del self.waiting[name]
                    rec = self.journal.get(name)
                    if rec is not None and rec.get("manifest_id") == wait.manifest_id:
                        self.journal.clear(name)
                    self._clean_downloads()

    # -- disk space ------------------------------------------------------------------------
    def _free_bytes(self) -> int:
        return int(shutil.disk_usage(self.cfg.state_dir).free)

    def _check_space(self, m: Manifest) -> None:
        """check_disk against the state directory's filesystem, less what the other downloads
        in progress still need (their chunks to come and their targets)."""
        reserved = sum(space_needed(dl.manifest, have_bytes=dl.chunks.bytes_received())
                       for name, dl in self.downloads.items() if name != m.model)
        check_disk(m, self._free_bytes(),
                   have_bytes=chunk_bytes_on_disk(self.store.download_dir(m.artifact.sha256)),
                   reserved_bytes=reserved, margin_bytes=self.cfg.disk_margin_bytes,
                   max_artifact_bytes=self.cfg.max_artifact_bytes)

    def _wait_for_space(self, m: Manifest, raw: bytes, reason: str, step: str) -> None:
        """Too little disk for ``m``: report ``waiting`` (once per manifest and ``step``), keep
        its chunks and the journal record, and try the manifest again in ``disk_retry_s``.
        Never marked failed (the server uses no attempt on it): the update goes on by itself
        when space is back."""
        log.warning("update of %s to %s held back: %s", m.model, m.version, reason)
        self.waiting[m.model] = SpaceWait(m.manifest_id, m.artifact.sha256, raw,
                                          time.monotonic() + self.cfg.disk_retry_s)
        key = f"waiting:{step}"
        if (m.manifest_id, key) in self._space_reported:
            return  # said once per manifest and step; the retries are in the log
        self._space_reported.add((m.manifest_id, key))
        current = self.store.current(m.model)
        self.report(m, "waiting", reason=reason, sha256=current.sha256 if current else None,
                    id_key=key)

    def _pause_download(self, dl: ActiveDownload, reason: str) -> None:
        m = dl.manifest
        self.mqtt.unsubscribe(self.topics.chunk_filter(m.artifact.sha256))
        self.downloads.pop(m.model, None)
        self._wait_for_space(m, dl.raw, reason, "download")

    def _clean_downloads(self) -> None:
        """Remove the chunks of every artifact no longer wanted (superseded, refused, done,
        or left by a crash); not while journal records are being recovered."""
        if self.recovering:
            return
        keep = {dl.manifest.artifact.sha256 for dl in self.downloads.values()}
        keep |= {w.artifact_sha256 for w in self.waiting.values()}
        for sha in self.store.drop_downloads_except(keep):
            log.info("removed the leftover chunks of artifact %s", sha[:12])

    def _soft(self, what: str, fn: Any, *args: Any) -> bool:
        """Run a durable write whose failure for disk space must not stop the step (rollback,
        failure marks); False (logged) if it could not be written."""
        try:
            fn(*args)
        except OSError as e:
            if not is_no_space(e):
                raise
            log.error("disk full: could not %s (%s); going on", what, e.strerror)
            return False
        return True

    def _advance_soft(self, model: str, step: str, **extra: Any) -> dict[str, Any] | None:
        """Advance the journal after activation; on ENOSPC/EDQUOT the record stays a step behind
        (recovery after a restart then repeats the trial, which is safe) and later steps of
        this update are written best effort."""
        try:
            rec = self.journal.advance(model, step, **extra)
        except OSError as e:
            if not is_no_space(e):
                raise
            log.error("disk full: journal of %s not advanced to %s (%s)", model, step, e.strerror)
            self._journal_behind.add(model)
            return None
        except ValueError:
            if model not in self._journal_behind:
                raise
            log.error("journal of %s is behind (an earlier write hit a full disk); %s not "
                      "recorded", model, step)
            return None
        return rec

    def _store_unsaved(self) -> None:
        """Move reports held in memory (the outbox could not write them) to the outbox."""
        for eid, (topic, payload) in list(self.unsaved.items()):
            try:
                self.outbox.put(eid, topic, payload)
            except OSError as e:
                if not is_no_space(e):
                    raise
                self._unsaved_retry_at = time.monotonic() + self.cfg.disk_retry_s
                return
            del self.unsaved[eid]
            log.info("report %s stored in the outbox now that there is space", eid)

    # -- apply -----------------------------------------------------------------------------
    def finish(self, dl: ActiveDownload) -> None:
        m = dl.manifest
        self.mqtt.unsubscribe(self.topics.chunk_filter(m.artifact.sha256))
        self.downloads.pop(m.model, None)
        self.report(m, "applying", bytes_received=dl.chunks.bytes_received(),
                    chunks_reused=dl.chunks.reused)
        self.install(m, dl.chunks, reused=dl.chunks.reused, raw=dl.raw)

    def install(self, m: Manifest, chunks: ChunkSet | None, *, reused: int, raw: bytes) -> None:
        """Patch (when ``chunks`` holds an artifact) and stage, then swap the new model in.
        Disk too full at any step: the old model keeps running and ``raw`` is tried again."""
        try:
            if chunks is not None:
                self.journal.advance(m.model, "patching")
                artifact = chunks.source()  # verified against the signed artifact sha256
                current = self.store.current(m.model)
                base = self.store.model_path(current.sha256, current.format) if current else None
                path = self.store.model_path(m.target_sha256, m.format)
                if not path.exists():  # streamed to disk and verified before it appears
                    self._decode(m, artifact, base, path)
                self._crash_point("patch")
                self.journal.advance(m.model, "staged")
                self._crash_point("stage")
            else:
                path = self.store.model_path(m.target_sha256, m.format)
            previous = self.store.current(m.model)
            session, kept = self._swap_in(m, path)
        except (NoSpace, OSError) as e:
            if not isinstance(e, NoSpace) and not is_no_space(e):
                raise
            reason = str(e) if isinstance(e, NoSpace) else (
                f"disk full while applying ({e.strerror}); retrying when space is back")
            self._wait_for_space(m, raw, reason, "apply")  # verified chunks stay for the retry
            return
        except (UpdateRejected, ModelRuntimeError) as e:
            self.store.drop_download(m.artifact.sha256)
            self.journal.clear(m.model)
            self.fail(m, "failed", str(e))
            return
        self.store.drop_download(m.artifact.sha256)
        self._clean_downloads()
        _freeze_heap()
        log.info("now running %s %s (%s)", m.model, m.version, m.target_sha256[:12])
        window = float(m.trial_window_s)
        self._advance_soft(m.model, "trial", trial={
            "ends_at": time.time() + window, "restarts": 0})
        self.report(m, "trial", sha256=m.target_sha256,
                    bytes_received=m.artifact.size_bytes if chunks else 0, chunks_reused=reused)
        self._crash_point("trial")
        self._start_trial(m, previous, window, session=session, kept=kept, may_load=False)

    def _decode_limits(self) -> dict[str, float]:
        cap = self.cfg.patch_memory_bytes
        return {"memory_bytes": cap if cap is not None else default_memory_cap_bytes(),
                "timeout_s": self.cfg.patch_timeout_s}

    def _decode(self, m: Manifest, artifact: ChunkSource, base: Path | None, path: Path) -> None:
        """Decode in the contained child (``update.apply_to_file``). A refusal is recorded
        durably for the artifact before it is reported, and so is every start: an agent
        that dies while decoding (power, OOM) tries once more after the restart, then
        refuses the artifact instead of looping."""
        sha = m.artifact.sha256
        if self.store.note_decode_start(sha) > MAX_DECODE_STARTS:
            reason = (f"decode refused: the agent stopped while decoding this artifact "
                      f"{MAX_DECODE_STARTS} times")
            self.store.refuse_artifact(sha, reason)
            raise ArtifactRefused(reason)
        limits = self._decode_limits()
        try:
            apply_to_file(m, artifact, base, path, max_memory_bytes=int(limits["memory_bytes"]),
                          timeout_s=limits["timeout_s"])
        except DecodeLimitHit as e:
            self.store.refuse_artifact(sha, str(e), limits=limits)
            raise
        except ArtifactRefused as e:
            self.store.refuse_artifact(sha, str(e))
            raise
        except OSError as e:
            if not is_no_space(e):
                raise
            raise NoSpace(f"disk full writing the target ({e.strerror}); retrying when space "
                          "is back") from e
        except UpdateRejected as e:  # not the artifact's fault, e.g. ENOSPC in the child
            free = self._free_bytes()
            if free < m.target_size_bytes + self.cfg.disk_margin_bytes:
                raise NoSpace(f"disk full writing the target ({e}): {free >> 10} KiB free for a "
                              f"{m.target_size_bytes >> 10} KiB target, retrying when space is "
                              "back") from e
            raise
        finally:
            self.store.decode_done(sha)

    def _golden(self, m: Manifest) -> list[Any]:
        try:
            return decode_golden(m.golden_inputs)
        except (ValueError, TypeError, KeyError) as e:
            raise UpdateRejected(f"golden inputs do not decode: {e}") from e

    def _warm_up(self, model: LoadedModel, golden: list[Any], runs: int | None = None) -> None:
        for _ in range(max(1, runs if runs is not None else self.cfg.warmup_runs)):
            for feeds in probe_feeds(model, golden):
                check_outputs(model, model.run(feeds), _batch(feeds))

    def _check_io(self, m: Manifest, model: LoadedModel, old_sig: dict[str, Any] | None) -> None:
        sig = io_signature(model)
        if m.io_signature is not None:
            diff = io_difference(sig, m.io_signature)
            if diff:
                raise UpdateRejected(f"model does not match the signed IO signature: {diff}")
        if old_sig is not None and not m.allow_io_change:
            diff = io_difference(sig, old_sig)
            if diff:
                raise UpdateRejected(f"IO contract changed ({diff}) and the manifest does not "
                                     "allow it (allow_io_change)")

    def _probe(self, model: LoadedModel, golden: list[Any], n: int,
               session: Session | None) -> list[int]:
        """Run ``n`` golden/zero inferences (bounded in time); count them on ``session``."""
        feeds_list = probe_feeds(model, golden)
        samples: list[int] = []
        deadline = time.monotonic() + PROBE_BUDGET_S
        for i in range(n):
            feeds = feeds_list[i % len(feeds_list)]
            t0 = time.perf_counter()
            ok = True
            try:
                check_outputs(model, model.run(feeds), _batch(feeds))
            except ModelRuntimeError:
                ok = False
            us = int((time.perf_counter() - t0) * 1e6)
            if ok:
                samples.append(us)
            if session is not None:
                session.stats.record(us, ok)
            if time.monotonic() > deadline:
                break
        return samples

    def _swap_mode(self, path: Path) -> str:
        if self.cfg.swap_mode != "auto":
            return self.cfg.swap_mode
        free = mem_available_bytes()
        need = self.cfg.swap_memory_factor * path.stat().st_size
        return "cold" if free is not None and free < need else "warm"

    def _swap_in(self, m: Manifest, path: Path) -> tuple[Session, Session | None]:
        """Load, check and warm the new model, then flip to it (warm or cold swap). Returns
        the new session and, after a warm swap, the previous one, still loaded (the trial
        compares the two, see ``_pairing_partner``; the caller closes it)."""
        golden = self._golden(m)
        old = self.serving.current(m.model)
        old_sig = io_signature(old.model) if old is not None else None
        new_inst = InstalledModel(m.model, m.version, m.target_sha256, m.variant, m.format,
                                  m.serial, m.manifest_id)

        def prepare() -> LoadedModel:
            model = load_model(path, m.format)
            try:
                self._check_io(m, model, old_sig)
                self._warm_up(model, golden)
            except BaseException:
                model.close()
                raise
            return model

        def activate(model: LoadedModel) -> None:
            try:  # state.json is put back in memory if its write fails (ENOSPC)
                self.journal.advance(m.model, "activating")
                self.store.activate(new_inst)
            except BaseException:
                model.close()
                raise

        if self._swap_mode(path) == "warm" or old is None:
            model = prepare()
            activate(model)
            self._crash_point("activate")
            session = Session(model, m.version, m.target_sha256)
            return session, self.serving.slot(m.model).flip(session)
        # Cold: not enough memory for both. Requests are held (not failed) during the gap.
        log.info("cold swap of %s: unloading %s first", m.model, old.version)
        slot = self.serving.slot(m.model)
        slot.close_gap()
        try:
            previous = slot.flip(None)
            if previous is not None:
                previous.drain_and_close()
            try:
                model = prepare()
                activate(model)
            except BaseException:
                prev_inst = self.store.current(m.model)
                if prev_inst is not None:
                    slot.flip(Session(self._load_verified(prev_inst), prev_inst.version,
                                      prev_inst.sha256))
                raise
            self._crash_point("activate")
            session = Session(model, m.version, m.target_sha256)
            slot.flip(session)
            return session, None
        finally:
            slot.open_gap()

    # -- trial -----------------------------------------------------------------------------
    def _start_trial(self, m: Manifest, previous: InstalledModel | None, window_s: float, *,
                     session: Session | None = None, kept: Session | None = None,
                     may_load: bool = True) -> None:
        session = session or self.serving.current(m.model)
        if session is None:
            if kept is not None:
                kept.drain_and_close()
            self.journal.advance(m.model, "rolling_back", verdict={
                "reason": "new model is not loaded", "figures": {}})
            self._roll_back(m, Verdict(False, "new model is not loaded", {}))
            return
        policy = HealthPolicy.from_manifest(m.health_policy, self.defaults)
        partner, unjudged = self._pairing_partner(policy, session, kept, previous,
                                                  may_load=may_load)
        trial = Trial(m, session, policy, time.monotonic() + window_s, previous,
                      self._golden(m), partner, unjudged)
        self.trials[m.model] = trial
        if window_s <= 0:
            self._judge(m.model, trial, final=True)

    def _pairing_partner(self, policy: HealthPolicy, new: Session, kept: Session | None,
                         previous: InstalledModel | None, *,
                         may_load: bool) -> tuple[Session | None, str]:
        """The previous version, loaded beside the new one for the trial's paired latency
        probes (``kept`` from a warm swap, or loaded now after a restart when memory allows
        it, by the swap's own rule); else None and why latency cannot be judged."""
        why = ""
        if not policy.judges_latency:
            why = "off"
        elif kept is None:
            if previous is None:
                why = "no previous version to compare with"
            elif not may_load:
                why = "the previous version was unloaded for a cold swap"
            elif self._swap_mode(self.store.model_path(previous.sha256,
                                                       previous.format)) != "warm":
                why = "not enough memory to load the previous version beside the new one"
            else:
                try:
                    kept = Session(self._load_verified(previous), previous.version,
                                   previous.sha256)
                except ModelRuntimeError as e:
                    why = f"the previous version does not load: {e}"
        if kept is not None and not why and io_difference(io_signature(kept.model),
                                                          io_signature(new.model)):
            why = "the IO contract changed"
        if why and kept is not None:
            kept.drain_and_close()
            kept = None
        return kept, why

    def _judge(self, name: str, trial: Trial, *, final: bool) -> None:
        stats = trial.session.stats
        pairs: list[tuple[int, int]] = []
        if final:
            if trial.partner is not None:  # interleaved old/new calls on the same inputs
                pairs = sample_pairs(trial.partner.model, trial.session.model,
                                     probe_feeds(trial.session.model, trial.golden),
                                     max(trial.policy.min_requests, MIN_PAIRS),
                                     budget_s=PAIR_BUDGET_S, on_new=stats.record)
            requests, _, _ = stats.snapshot()
            if requests < trial.policy.min_requests:
                self._probe(trial.session.model, trial.golden,
                            trial.policy.min_requests - requests, trial.session)
        requests, errors, _ = stats.snapshot()
        verdict = evaluate(requests, errors, trial.policy, final=final, pairs=pairs,
                           unjudged=trial.unjudged)
        if verdict is None:
            return
        del self.trials[name]
        m = trial.manifest
        if verdict.ok:
            if trial.partner is not None:
                trial.partner.drain_and_close()
            self._advance_soft(name, "committing", verdict={"reason": verdict.reason,
                                                            "figures": verdict.figures})
            self._crash_point("commit")
            self._commit(m, verdict)
        else:
            log.warning("trial of %s %s failed: %s %s", name, m.version, verdict.reason,
                        verdict.figures)
            self._advance_soft(name, "rolling_back", verdict={"reason": verdict.reason,
                                                              "figures": verdict.figures})
            self._crash_point("rollback")
            self._roll_back(m, verdict, loaded=trial.partner)
        pending = self.pending.get(name)
        if pending is not None:  # still known (accepted) while it is handled
            self.on_manifest(name, pending[1])
            if self.pending.get(name) is pending:
                del self.pending[name]

    def _commit(self, m: Manifest, verdict: Verdict) -> None:
        self.report(m, "healthy", sha256=m.target_sha256, health=verdict.figures,
                    reason=verdict.note)
        self.journal.clear(m.model)
        self._journal_behind.discard(m.model)
        log.info("committed %s %s: %s", m.model, m.version, verdict.figures)

    def _roll_back(self, m: Manifest, verdict: Verdict, *, loaded: Session | None = None) -> None:
        """Put the previous model back in service (warm when memory allows, at once when the
        trial kept it ``loaded``), then report."""
        self.trials.pop(m.model, None)
        durable = True
        current = self.store.current(m.model)
        if current is not None and current.sha256 == m.target_sha256:
            prev = self.store.previous(m.model)
            if prev is not None:
                path = self.store.model_path(prev.sha256, prev.format)
                if loaded is not None and loaded.sha256 == prev.sha256:
                    durable = self._soft("roll state.json back", self.store.rollback,
                                         m.model, m.manifest_id)
                    self.serving.install(m.model, loaded.model, prev.version, prev.sha256)
                    loaded = None
                elif self._swap_mode(path) == "warm":
                    model = self._load_verified(prev)
                    durable = self._soft("roll state.json back", self.store.rollback,
                                         m.model, m.manifest_id)
                    self.serving.install(m.model, model, prev.version, prev.sha256)
                else:
                    self.serving.install_cold(m.model, lambda: self._load_verified(prev),
                                              prev.version, prev.sha256)
                    durable = self._soft("roll state.json back", self.store.rollback,
                                         m.model, m.manifest_id)
            else:  # first install failed its trial: nothing to go back to but the fallback
                old = self.serving.slot(m.model).flip(None)
                durable = self._soft("roll state.json back", self.store.rollback, m.model,
                                     m.manifest_id)
                if old is not None:
                    old.drain_and_close()
        else:
            durable = self._soft("mark the manifest failed", self.store.mark_failed, m.model,
                                 m.manifest_id, m.serial)
        if loaded is not None:
            loaded.drain_and_close()
        # what runs now (state.json; what serves if state.json could not be written)
        now = self.store.current(m.model) if durable else self.serving.current(m.model)
        self.report(m, "rolled_back", reason=verdict.reason, sha256=now.sha256 if now else None,
                    health=verdict.figures)
        if not durable:  # state.json still names the failed model: a restart must finish this
            log.error("rollback of %s done in memory only; the journal finishes it at the next "
                      "restart", m.model)
            return
        self.journal.clear(m.model)
        self._journal_behind.discard(m.model)

    def fail(self, m: Manifest, state: str, reason: str) -> None:
        log.warning("update of %s to %s %s: %s", m.model, m.version, state, reason)
        dl = self.downloads.pop(m.model, None)
        if dl is not None:
            self.mqtt.unsubscribe(self.topics.chunk_filter(m.artifact.sha256))
        self._soft("mark the manifest failed", self.store.mark_failed, m.model, m.manifest_id,
                   m.serial)
        current = self.store.current(m.model)
        self.report(m, state, reason=reason, sha256=current.sha256 if current else None)
        self._clean_downloads()

    # -- API view --------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        out = []
        names = {i.model for i in self.store.all_current()} | set(self.serving.slots)
        for name in sorted(names):
            inst = self.store.current(name)
            prev = self.store.previous(name)
            slot = self.serving.slots.get(name)
            session = slot.session if slot else None
            model = session.model if session else (slot.fallback if slot else None)
            out.append({
                "name": name,
                "version": session.version if session else None,
                "sha256": session.sha256 if session else None,
                "format": inst.format if inst else None,
                "previous": prev.version if prev else None,
                "loaded": session is not None,
                "fallback": slot.fallback_name if slot else None,
                "in_trial": name in self.trials,
                "swaps": slot.swaps if slot else 0,
                "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}
                           for s in (model.inputs if model else ())],
                "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}
                            for s in (model.outputs if model else ())],
            })
        return out

    # -- reporting -------------------------------------------------------------------------
    def report(self, m: Manifest, state: str, *, reason: str = "", sha256: str | None = None,
               bytes_received: int = 0, chunks_reused: int = 0,
               health: dict[str, int] | None = None, id_key: str | None = None) -> None:
        """``id_key`` (default ``state``) makes the stable event id: disk-space reports use
        their own, so the final outcome of the same manifest is never taken as a re-send."""
        ev = Event(
            event_id=event_id(self.cfg.device_id, m.manifest_id, id_key or state),
            device_id=self.cfg.device_id, manifest_id=m.manifest_id,
            rollout_id=m.rollout_id, model=m.model, version=m.version, state=state,
            reason=reason, sha256=sha256, bytes_received=bytes_received,
            chunks_total=len(m.artifact.chunks), chunks_reused=chunks_reused,
            health={k: int(v) for k, v in (health or {}).items()},
        )
        self._put_report(ev.event_id, encode(ev))

    def report_unverified(self, model: str, reason: str, payload: bytes) -> None:
        current = self.store.current(model)
        eid = hashlib.sha256(b"rejected|" + payload).hexdigest()[:32]
        ev = Event(
            event_id=eid, device_id=self.cfg.device_id, manifest_id=None,
            rollout_id=None, model=model, version="?", state="rejected", reason=reason,
            sha256=current.sha256 if current else None,
        )
        self._put_report(ev.event_id, encode(ev))

    def _put_report(self, eid: str, payload: bytes) -> None:
        """Into the outbox; if the disk is full, held in memory (in order) and stored when
        space is back (lost only if the agent stops first)."""
        topic = self.topics.events(self.cfg.device_id)
        if self.unsaved:
            self.unsaved[eid] = (topic, payload)
            return
        try:
            self.outbox.put(eid, topic, payload)
        except OSError as e:
            if not is_no_space(e):
                raise
            log.error("disk full: report %s kept in memory, not in the outbox (%s)", eid,
                      e.strerror)
            self.unsaved[eid] = (topic, payload)
            self._unsaved_retry_at = time.monotonic() + self.cfg.disk_retry_s


def _claimed_manifest_id(payload: bytes) -> str | None:
    """The manifest_id an envelope claims, unverified: only ever used to stay quiet."""
    try:
        env = parse_json_object(payload, max_bytes=MAX_MANIFEST_BYTES)
        mid = env.get("payload", {}).get("manifest_id")
    except (DeltafleetError, AttributeError):
        return None
    return mid if isinstance(mid, str) else None


def _freeze_heap() -> None:
    """Move the long-lived objects (runtimes, models, modules) out of the collector's way, so
    a full collection under request load takes ~1 ms instead of ~20 ms."""
    gc.collect()
    gc.freeze()


def _batch(feeds: dict[str, Any]) -> int | None:
    for v in feeds.values():
        shape = getattr(v, "shape", ())
        return int(shape[0]) if shape else None
    return None
