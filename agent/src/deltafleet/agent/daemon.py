"""The agent's main loop: one thread consumes the MQTT inbox and drives updates; request
threads of the local API run inference concurrently (see ``serving``).

Every update decision is the pure ``machine.UpdateMachine``'s (its module docstring holds the
transition table and the journal steps); ``Agent`` is its driver. It wires the adapters
(store, journal, trust, serving, MQTT, outbox), routes messages, turns them into the
machine's events, and hands the effects to ``executor.Executor``, which carries them out with
``swap`` (runtimes) and the store. Per model, an update moves through::

    idle -> downloading -> applying [patch, stage, load + IO check + warm-up, activate]
         -> trial -> healthy (trial within health_policy) | rolled_back (breach)
    any step before activation -> failed | rejected (the running model never changed)

Reports go through the on-disk outbox with stable event ids (``reports.event_id``), so they
survive broker outages and restarts and the server can apply each one once. After a restart
the journal is reconciled before anything else: a half-done update resumes, finishes its
commit, or finishes its rollback by itself.

Trust: with ``root_of_trust`` the agent follows ``{prefix}/trust/keys`` (see ``trust``); a
manifest refused for its signature is kept and checked again after the next accepted trust
update, so a rotation and a manifest signed by the new key may arrive in either order. The
retained online status is re-published every ``heartbeat_s`` (the server's last_seen).

Withdrawal: an empty payload on ``desired/<model>`` (the server cleared the retained manifest,
e.g. ``rollout abort``) is the machine's ``Withdrawn``: a download in progress stops (its
chunks and journal record removed) and the running model stays; an update applying or in its
trial goes on. It is unsigned on purpose: it can only stop an update, never install one.

The broker connection (``MqttClient.state()``) is written to ``connection.json`` in the state
directory on every change between up and down or of its cause, with the agent's pid, for
``fleet-agent status``; the local API's ``/v1/health`` carries it live.

Fault injection for tests: ``AgentConfig.faults`` (``config.FaultPlan``, from
FLEET_AGENT_CRASH_AT / FLEET_AGENT_CRASH_AFTER_CHUNKS) kills the agent at a step.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from deltafleet.shared import (
    Ack,
    DeltafleetError,
    Event,
    HealthPolicy,
    Hello,
    Status,
    Topics,
    decode,
    encode,
    trust_topic,
)
from deltafleet.shared.messages import MAX_ACK_BYTES, Portrait
from deltafleet.shared.mqtt import CONNECTED, DISCONNECTED, MqttClient, MqttSettings, Will

from . import machine as mc
from .bench import BenchRunner, verify_bench_request
from .config import CRASH_STEPS, AgentConfig
from .errors import AgentError, ModelRuntimeError, UpdateRejected, is_no_space
from .executor import MAX_DECODE_STARTS, Executor, Reporter, freeze_heap, soft
from .journal import Journal, found_entries
from .outbox import Outbox
from .portrait import device_portrait
from .profile import agent_version, device_profile, hardware_id, mem_available_bytes
from .reports import event_id
from .serving import Serving
from .store import LocalStore
from .swap import PAIR_BUDGET_S, PROBE_BUDGET_S, Swapper, TrialRunner
from .telemetry import TelemetryRecorder, render_exposition
from .trust import RootTrust, open_trust
from .update import verify_manifest
from .views import ConnectionFile, TelemetrySender, describe_models, variant_of

__all__ = ["CRASH_STEPS", "MAX_DECODE_STARTS", "PAIR_BUDGET_S", "PROBE_BUDGET_S", "Agent",
           "agent_version", "device_profile", "event_id", "hardware_id", "mem_available_bytes"]

log = logging.getLogger(__name__)
TICK_S = 0.1
API_RETRY_S = 30.0  # longest the agent spends on golden/zero probes for one measurement


class _MqttPublisher:
    def __init__(self, mqtt: MqttClient) -> None:
        self.mqtt = mqtt

    def is_connected(self) -> bool:
        return self.mqtt.connected.is_set()

    def publish_acked(self, topic: str, payload: bytes, timeout_s: float) -> None:
        self.mqtt.publish_wait(topic, payload, qos=1, timeout_s=timeout_s)


class _CountingReporter(Reporter):
    """The executor's reporter, also telling the telemetry about swaps and trial verdicts."""

    def __init__(self, outbox: Outbox, topic: str, retry_s: float,
                 telemetry: TelemetryRecorder) -> None:
        super().__init__(outbox, topic, retry_s)
        self._telemetry = telemetry

    def put(self, eid: str, payload: bytes) -> None:
        super().put(eid, payload)
        try:
            self._telemetry.on_report(decode(Event, payload))
        except DeltafleetError:
            log.debug("report %s not counted in telemetry", eid, exc_info=True)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.topic_prefix)
        self.store = LocalStore(cfg.state_dir)
        self.journal = Journal(Path(cfg.state_dir) / "journal")
        self.trust = open_trust(cfg, int(time.time()))
        self.hardware_id = hardware_id(cfg)
        self._last_heartbeat = 0.0
        self.serving = Serving(results_size=cfg.results_cache_size,
                               hold_timeout_s=cfg.hold_timeout_s)
        self.stop_event = threading.Event()
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
        self.machine = mc.UpdateMachine(mc.MachineConfig(
            download_timeout_s=cfg.download_timeout_s, chunk_retry_s=cfg.chunk_retry_s,
            disk_retry_s=cfg.disk_retry_s, disk_margin_bytes=cfg.disk_margin_bytes,
            max_artifact_bytes=cfg.max_artifact_bytes, max_trial_restarts=cfg.max_trial_restarts))
        self.telemetry = TelemetryRecorder(cfg.device_id)
        self.telemetry_sender = TelemetrySender(
            self.telemetry, self.outbox, self.topics.telemetry(cfg.device_id),
            cfg.telemetry_interval_s, partial(variant_of, self.store))
        self.reporter = _CountingReporter(self.outbox, self.topics.events(cfg.device_id),
                                          cfg.disk_retry_s, self.telemetry)
        self.swapper = Swapper(cfg, self.store, self.serving, soft)
        self.trials = TrialRunner(self.swapper, HealthPolicy(
            cfg.trial_max_error_rate_ppm, cfg.trial_max_p95_ratio_pct, cfg.trial_min_requests,
            cfg.trial_p95_slack_us))
        self.executor = Executor(cfg, self.machine, store=self.store, journal=self.journal,
                                 mqtt=self.mqtt, topics=self.topics, trust=self.trust,
                                 hardware_id=self.hardware_id, swapper=self.swapper,
                                 trials=self.trials, reporter=self.reporter)
        self.bench = BenchRunner(Path(cfg.state_dir), cfg.device_id, store=self.store,
                                 outbox=self.outbox, mqtt=self.mqtt, topics=self.topics,
                                 sysfs_root=cfg.sysfs_root)
        self.api: Any = None
        self.connection_file = ConnectionFile(cfg.state_dir)
        self._api_retry_at: float | None = 0.0 if cfg.api_port else None

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
                model = self.swapper.load_verified(inst)
            except ModelRuntimeError as e:
                log.error("current model %s does not load: %s", inst.model, e)
                prev = self.store.previous(inst.model)
                if prev is None:
                    continue
                model = self.swapper.load_verified(prev)
                self.store.rollback(inst.model, inst.manifest_id)
                inst = prev
            self.serving.install(inst.model, model, inst.version, inst.sha256)

    def run(self) -> None:
        self.executor.feed(mc.Restarted(found_entries(self.journal, self.store, partial(
            verify_manifest, trust=self.trust, device_id=self.cfg.device_id,
            hardware_id=self.hardware_id, check_expiry=False))))
        self.load_installed()
        self.executor.feed(mc.Resumed(time.time()))
        freeze_heap()
        self._start_api()
        if isinstance(self.trust, RootTrust):  # before desired/: keys first where possible
            self.mqtt.subscribe(trust_topic(self.topics.prefix))
        self.mqtt.subscribe(self.topics.desired_filter(self.cfg.device_id))
        self.mqtt.subscribe(self.topics.server_status())
        self.mqtt.subscribe(self.topics.ack(self.cfg.device_id))
        self.mqtt.subscribe(self.topics.bench_request(self.cfg.device_id))
        self.mqtt.start()
        self.outbox.start()
        log.info("agent %s started; broker %s", self.cfg.device_id, self.cfg.broker_url)
        try:
            while not self.stop_event.is_set():
                try:
                    topic, payload = self.mqtt.inbox.get(timeout=TICK_S)
                except queue.Empty:
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
            self._shut_down()

    def _shut_down(self) -> None:
        self.bench.stop()
        if self.api is not None:
            self.api.stop()
        self.write_connection(stopped=True)
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
                                    self.cfg.api_port,
                                    connection=lambda: self.mqtt.state().to_dict(),
                                    telemetry=self.telemetry, metrics=self.metrics_page)
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
        elif topic == self.topics.bench_request(self.cfg.device_id):
            if payload:
                self.on_bench_request(payload)
        elif topic.startswith(f"{self.topics.prefix}/art/"):
            sha, index = self.topics.parse_chunk(topic)
            if self.bench.wants(sha):
                self.bench.on_chunk(sha, index, payload)
            self.executor.on_chunk(sha, index, payload)
        elif topic.startswith(self.topics.dev(self.cfg.device_id, "desired") + "/"):
            model = topic.rsplit("/", 1)[1]
            if payload:
                self.on_manifest(model, payload)
            else:  # the retained manifest cleared: withdrawn (an abort stops a download)
                self.executor.feed(mc.Withdrawn(model))

    def on_manifest(self, model: str, payload: bytes) -> None:
        self.executor.feed(self.executor.manifest_event(model, payload))

    def on_bench_request(self, payload: bytes) -> None:
        """A signed benchmark request: verified like a manifest, run off the request path."""
        try:
            req = verify_bench_request(payload, self.trust, self.cfg.device_id)
        except DeltafleetError as e:
            log.warning("ignoring a bench request: %s", e)
            return
        if self.bench.submit(req):
            log.info("bench request %s: %d variants queued", req.request_id, len(req.variants))

    def on_trust(self, payload: bytes) -> None:
        """A trust bundle (root chain + key list): apply, persist, re-check held manifests."""
        assert isinstance(self.trust, RootTrust)
        try:
            changed = self.trust.apply(payload, int(time.time()))
        except UpdateRejected as e:
            log.error("%s; keeping root v%d", e, self.trust.store.root.version)
            return
        if changed:
            self.executor.feed(mc.TrustUpdated())

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
        self.telemetry_sender.acked(ack.event_ids)

    def publish_status(self) -> None:
        did = self.cfg.device_id
        self.mqtt.publish(self.topics.status(did), encode(Status(did, True)), retain=True)
        self._last_heartbeat = time.monotonic()

    def on_connected(self) -> None:
        self.publish_status()
        self.send_hello()
        self.outbox.resend_all()  # what the broker took before may be lost: send it again
        self.executor.feed(mc.Connected(time.monotonic()))

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
        self.send_portrait()

    def send_portrait(self) -> None:
        """What the device can actually use (``portrait``), after each hello."""
        did = self.cfg.device_id
        try:
            doc = device_portrait(self.cfg.state_dir, sysfs_root=self.cfg.sysfs_root)
        except OSError as e:
            log.warning("cannot read the device portrait: %s", e)
            return
        self.mqtt.publish(self.topics.portrait(did), encode(Portrait(did, doc)))

    def tick(self) -> None:
        now = time.monotonic()
        if self._api_retry_at is not None:
            self._start_api()
        connected = self.mqtt.connected.is_set()
        if self.cfg.heartbeat_s and now - self._last_heartbeat >= self.cfg.heartbeat_s and connected:
            self.publish_status()
        self.executor.feed(mc.Tick(now, connected))
        self.telemetry_sender.tick(now)
        self.reporter.store_unsaved(now)
        self.write_connection()

    def write_connection(self, *, stopped: bool = False) -> None:
        """``connection.json`` for ``fleet-agent status``, on a change only (see module doc)."""
        api = f"http://{self.cfg.api_host}:{self.api.port}" if self.api else None
        self.connection_file.write(self.mqtt.state(), api=api, stopped=stopped)

    # -- views -----------------------------------------------------------------------------
    def metrics_page(self) -> bytes:
        return render_exposition(self.telemetry, agent_version=agent_version(),
                                 models=self.describe(), outbox_pending=self.outbox.pending(),
                                 broker_connected=self.mqtt.connected.is_set(),
                                 variant_of=partial(variant_of, self.store))

    def describe(self) -> list[dict[str, Any]]:
        return describe_models(self.store, self.serving, self.machine.in_trial)
