"""Inference telemetry of this device: counted per served (model, version), summarised for the
server through the outbox and shown to a site Prometheus on the local API's ``/metrics``.

What is counted (cumulative since the agent started; ``boot_id`` names the start):

    requests        predicts of the local API that reached a model slot
    errors          of those, the ones the primary did not answer (the fallback may have)
    fallbacks       answers the fallback model gave
    latency         answered requests by latency (buckets ``TELEMETRY_LATENCY_BOUNDS_US``)
    swaps           switches to this version (a ``trial`` report: the new model serves)
    trials          trial verdicts of this version: passed (``healthy``) or failed
                    (``rolled_back``), with the last trial's figures (latency ratio, error rate)
    agreement       per trial, how far the new version's answers agree with the previous
                    one's on the same inputs (``latency.output_agreement``, ppm)

Bounded: at most ``MAX_TELEMETRY_MODELS`` (model, version) entries; beyond that the entry
updated longest ago is dropped (its counts leave the summary; the server keeps what it has
already summed). A summary carries only the entries that changed since the last summary the
server acknowledged (``acked``): a version the device no longer serves stops costing bytes
once its final counts are in, so a device serving one model sends one entry a minute however
many versions it ran since it started. The server keeps every entry's last counters, so an
entry left out is unchanged, not zero. A summary is one ``Telemetry`` message (a few hundred
bytes per entry).

The text exposition is written here (no client library: the agent's metrics are a handful of
families, and the agent's dependencies stay paho-mqtt and numpy); ``promtool check metrics``
checks it in tests.
"""

from __future__ import annotations

import os
import platform
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from deltafleet.shared import Event, ModelTelemetry, Telemetry
from deltafleet.shared.messages import (
    MAX_TELEMETRY_MODELS,
    TELEMETRY_COUNTERS,
    TELEMETRY_LATENCY_BOUNDS_US,
)

__all__ = ["TelemetryRecorder", "render_exposition", "rss_bytes"]

SENT_KEPT = 8  # unacknowledged summaries remembered (the outbox holds only the newest)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class _Counts:
    """One (model, version)'s cumulative counters: ``n`` by the names of the wire's
    ``TELEMETRY_COUNTERS`` (one list of them), the latency buckets, the last trial's figures."""

    n: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TELEMETRY_COUNTERS, 0))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(TELEMETRY_LATENCY_BOUNDS_US) + 1))
    trial_figures: dict[str, int] = field(default_factory=dict)


def _bucket(latency_us: int) -> int:
    for i, bound in enumerate(TELEMETRY_LATENCY_BOUNDS_US):
        if latency_us <= bound:
            return i
    return len(TELEMETRY_LATENCY_BOUNDS_US)


class TelemetryRecorder:
    """Thread-safe counters; request threads record, the agent thread summarises."""

    def __init__(self, device_id: str, *, clock: Callable[[], float] = time.time,
                 max_models: int = MAX_TELEMETRY_MODELS) -> None:
        self.device_id = device_id
        self.boot_id = uuid.uuid4().hex[:16]
        self.started_at = clock()
        self.clock = clock
        self.max_models = max_models
        self.seq = 0
        self._lock = threading.Lock()
        self._counts: OrderedDict[tuple[str, str], _Counts] = OrderedDict()
        self._last_version: dict[str, str] = {}
        # the counters each entry had in the newest summary the server acknowledged, and
        # those of the summaries sent since (by seq), not acknowledged yet
        self._acked: dict[tuple[str, str], tuple[int, ...]] = {}
        self._sent: dict[int, dict[tuple[str, str], tuple[int, ...]]] = {}

    def _entry(self, model: str, version: str) -> _Counts:
        key = (model, version)
        c = self._counts.get(key)
        if c is None:
            c = self._counts[key] = _Counts()
            while len(self._counts) > self.max_models:
                gone, _ = self._counts.popitem(last=False)
                self._acked.pop(gone, None)
        else:
            self._counts.move_to_end(key)
        return c

    # -- recording (request threads) --------------------------------------------------------
    def record(self, model: str, version: str | None, *, latency_us: int | None,
               error: bool, fallback: bool) -> None:
        """One predict: ``version`` of the primary that answered (None when it did not: the
        request counts for the version the slot served last); ``latency_us`` None when nothing
        answered."""
        with self._lock:
            if version:
                self._last_version[model] = version
            c = self._entry(model, version or self._last_version.get(model, ""))
            c.n["requests"] += 1
            c.n["errors"] += int(error)
            c.n["fallbacks"] += int(fallback)
            if latency_us is not None:
                c.n["latency_sum_us"] += max(0, latency_us)
                c.buckets[_bucket(latency_us)] += 1

    def on_report(self, event: Event) -> None:
        """An update report the agent sends: swaps and trial verdicts."""
        if event.version is None:
            return
        state = event.state.value
        with self._lock:
            if state == "trial":
                self._entry(event.model, event.version).n["swaps"] += 1
                self._last_version[event.model] = event.version
            elif (state == "healthy" and event.health) or state == "rolled_back":
                c = self._entry(event.model, event.version)
                if state == "healthy":
                    c.n["trials_passed"] += 1
                else:
                    c.n["trials_failed"] += 1
                c.trial_figures = dict(event.health)
                if "agreement_ppm" in event.health:
                    c.n["agreement_ppm_sum"] += max(0, min(1_000_000, event.health["agreement_ppm"]))
                    c.n["agreement_trials"] += 1

    # -- reading (agent thread, /metrics) ---------------------------------------------------
    def snapshot(self) -> dict[tuple[str, str], _Counts]:
        with self._lock:
            return {k: _Counts(dict(c.n), list(c.buckets), dict(c.trial_figures))
                    for k, c in self._counts.items()}

    def summary(self, variant_of: Callable[[str, str], str] | None = None) -> Telemetry:
        """The next summary message (``seq`` advances): the entries changed since the last
        acknowledged summary."""
        now = self.clock()
        with self._lock:
            acked = dict(self._acked)
        models = tuple(
            ModelTelemetry(model=m, version=v, variant=(variant_of(m, v) if variant_of else ""),
                           **c.n, latency_buckets=tuple(c.buckets))
            for (m, v), c in self.snapshot().items() if acked.get((m, v)) != _vector(c))
        with self._lock:
            self.seq += 1
            seq = self.seq
            self._sent[seq] = {(x.model, x.version): _vector(x) for x in models}
            for old in [k for k in self._sent if k <= seq - SENT_KEPT]:
                del self._sent[old]  # unacked for long (server away): a late ack just sends more
        return Telemetry(telemetry_id=f"tm-{self.boot_id}-{seq}", device_id=self.device_id,
                         boot_id=self.boot_id, seq=seq, sent_at=int(now),
                         uptime_s=int(max(0.0, now - self.started_at)), rss_bytes=rss_bytes(),
                         models=models)


    def acked(self, seq: int) -> None:
        """The server acknowledged summary ``seq``: what it carried is what the server has
        (an older summary acknowledged late changes nothing newer)."""
        with self._lock:
            for s in sorted(k for k in self._sent if k <= seq):
                for key, vec in self._sent.pop(s).items():
                    if key in self._counts:
                        self._acked[key] = vec


def _vector(c: _Counts | ModelTelemetry) -> tuple[int, ...]:
    """An entry's counters as one comparable tuple."""
    if isinstance(c, _Counts):
        return (*(c.n[k] for k in TELEMETRY_COUNTERS), *c.buckets)
    return (*(getattr(c, k) for k in TELEMETRY_COUNTERS), *c.latency_buckets)


# -- text exposition (format 0.0.4) ----------------------------------------------------------
def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, doc: str) -> None:
        self.lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, labels: Iterable[tuple[str, str]], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")


# The last trial's figures as gauges: (family, trial figure, divisor, help).
TRIAL_GAUGES = (
    ("deltafleet_agent_trial_latency_ratio", "latency_ratio_pct", 100,
     "Last trial: median latency of the new version over the previous one's, on the same "
     "inputs (paired samples)."),
    ("deltafleet_agent_trial_output_agreement_ratio", "agreement_ppm", 1e6,
     "Last trial: share of the new version's answers agreeing with the previous version's "
     "on the same inputs (top class, else values within 0.1%)."),
)


def render_exposition(rec: TelemetryRecorder, *, agent_version: str,
                      models: list[dict[str, object]], outbox_pending: int,
                      broker_connected: bool,
                      variant_of: Callable[[str, str], str] | None = None) -> bytes:
    """The agent's /metrics page. ``models`` is ``Agent.describe()`` (what is served now)."""
    t = _Text()
    counts = rec.snapshot()

    def key_labels(model: str, version: str) -> list[tuple[str, str]]:
        return [("model", model), ("version", version),
                ("variant", variant_of(model, version) if variant_of else "")]

    t.family("deltafleet_agent_build_info", "gauge", "Agent version and Python (always 1).")
    t.sample("deltafleet_agent_build_info",
             [("version", agent_version), ("python", platform.python_version())], 1)
    t.family("deltafleet_agent_start_time_seconds", "gauge", "When the agent started (unix).")
    t.sample("deltafleet_agent_start_time_seconds", [], float(rec.started_at))
    t.family("deltafleet_agent_memory_rss_bytes", "gauge", "Resident memory of the agent.")
    t.sample("deltafleet_agent_memory_rss_bytes", [], rss_bytes())
    t.family("deltafleet_agent_outbox_messages", "gauge",
             "Reports waiting in the outbox for the server's ack.")
    t.sample("deltafleet_agent_outbox_messages", [], outbox_pending)
    t.family("deltafleet_agent_broker_connected", "gauge", "1 while connected to the broker.")
    t.sample("deltafleet_agent_broker_connected", [], int(broker_connected))
    t.family("deltafleet_agent_model_info", "gauge",
             "What each model slot serves now (primary, fallback or none); always 1.")
    for slot in models:
        serving = ("primary" if slot.get("loaded") else
                   "fallback" if slot.get("fallback") else "none")
        version = str(slot.get("version") or "")
        t.sample("deltafleet_agent_model_info",
                 [*key_labels(str(slot["name"]), version), ("serving", serving),
                  ("in_trial", "true" if slot.get("in_trial") else "false")], 1)
    for name, attr, doc in (
            ("deltafleet_agent_inference_requests_total", "requests",
             "Predict requests of the local API that reached a model."),
            ("deltafleet_agent_inference_errors_total", "errors",
             "Requests the primary model did not answer (the fallback may have)."),
            ("deltafleet_agent_fallback_answers_total", "fallbacks",
             "Answers given by the fallback model."),
            ("deltafleet_agent_model_swaps_total", "swaps", "Switches to this version."),
    ):
        t.family(name, "counter", doc)
        for (m, v), c in counts.items():
            t.sample(name, key_labels(m, v), c.n[attr])
    t.family("deltafleet_agent_trial_verdicts_total", "counter",
             "Trial verdicts of a version: passed (healthy) or failed (rolled back).")
    for (m, v), c in counts.items():
        t.sample("deltafleet_agent_trial_verdicts_total", [*key_labels(m, v), ("verdict", "passed")],
                 c.n["trials_passed"])
        t.sample("deltafleet_agent_trial_verdicts_total", [*key_labels(m, v), ("verdict", "failed")],
                 c.n["trials_failed"])
    for name, figure, scale, doc in TRIAL_GAUGES:
        t.family(name, "gauge", doc)
        for (m, v), c in counts.items():
            if figure in c.trial_figures:
                t.sample(name, key_labels(m, v), c.trial_figures[figure] / scale)
    name = "deltafleet_agent_inference_latency_seconds"
    t.family(name, "histogram", "Latency of answered predict requests.")
    for (m, v), c in counts.items():
        labels = key_labels(m, v)
        acc = 0
        for bound, n in zip((*TELEMETRY_LATENCY_BOUNDS_US, None), c.buckets, strict=True):
            acc += n
            le = "+Inf" if bound is None else repr(bound / 1e6)
            t.sample(f"{name}_bucket", [*labels, ("le", le)], acc)
        t.sample(f"{name}_sum", labels, c.n["latency_sum_us"] / 1e6)
        t.sample(f"{name}_count", labels, acc)
    return ("\n".join(t.lines) + "\n").encode()
