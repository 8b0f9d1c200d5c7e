"""This server process's own figures (per replica) and the /metrics HTTP endpoint.

Counters here live in one process: each replica exposes its own, told apart by the
``instance`` label Prometheus adds at scrape; sum them with ``sum without (instance)``. They
start from zero when the process starts (Prometheus' ``rate`` handles the reset).
The fleet figures (``fleet.FleetCollector``) come from the store and are the same on every
replica.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from ..config import parse_listen
from ..errors import UsageError
from ..guard import REFUSAL_REASONS, DeviceMessageGuard
from ..store import Store
from .fleet import FleetCollector

log = logging.getLogger(__name__)

PUBLISH_KINDS = ("full", "delta", "repair")
DATABASE_ERROR_KINDS = ("transient", "refused", "reconcile")
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def server_version() -> str:
    try:
        return version("deltafleet-server")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class ProcessCounters:
    """What the daemon counts as it goes (plain ints: the daemon thread writes, a scrape
    reads; an int update is atomic under the GIL)."""

    published_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PUBLISH_KINDS, 0))
    published_chunks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PUBLISH_KINDS, 0))
    database_errors: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(DATABASE_ERROR_KINDS, 0))
    broker_disconnects: int = 0
    telemetry_applied: int = 0


class _ProcessCollector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m, c = self.m, self.m.counters
        info = InfoMetricFamily("deltafleet_build", "Server version and Python.")
        info.add_metric([], {"version": server_version(), "python": platform.python_version()})
        yield info
        f = CounterMetricFamily("deltafleet_device_messages", "Device messages this replica "
                                "received.")
        f.add_metric([], m.stats.messages if m.stats else 0)
        yield f
        f = CounterMetricFamily("deltafleet_device_messages_refused", "Device messages this "
                                "replica refused, by reason (server/guard.py).", labels=["reason"])
        for reason in REFUSAL_REASONS:
            f.add_metric([reason], m.guard.refusals.get(reason, 0) if m.guard else 0)
        yield f
        g = GaugeMetricFamily("deltafleet_suspect_devices", "Devices this replica marks suspect "
                              "(repeated invalid messages; their ids are in its log).")
        g.add_metric([], m.guard.suspect_count() if m.guard else 0)
        yield g
        for name, values, doc in (
                ("deltafleet_published_bytes", c.published_bytes,
                 "Artifact chunk bytes published, by kind (full, delta, repair)."),
                ("deltafleet_published_chunks", c.published_chunks,
                 "Artifact chunks published, by kind (full, delta, repair).")):
            f = CounterMetricFamily(name, doc, labels=["kind"])
            for kind in PUBLISH_KINDS:
                f.add_metric([kind], values[kind])
            yield f
        f = CounterMetricFamily("deltafleet_database_errors", "Database failures: transient "
                                "(a batch retried), refused (a message the database would not "
                                "take), reconcile (a reconcile tick failed).", labels=["kind"])
        for kind in DATABASE_ERROR_KINDS:
            f.add_metric([kind], c.database_errors[kind])
        yield f
        f = CounterMetricFamily("deltafleet_broker_disconnects", "Times this replica lost its "
                                "broker connection.")
        f.add_metric([], c.broker_disconnects)
        yield f
        g = GaugeMetricFamily("deltafleet_broker_connected", "1 while this replica is "
                              "connected to the broker.")
        g.add_metric([], 1 if m.connected() else 0)
        yield g
        g = GaugeMetricFamily("deltafleet_ingest_backlog_messages", "Device messages received "
                              "and not yet handled by this replica.")
        g.add_metric([], m.backlog())
        yield g
        f = CounterMetricFamily("deltafleet_telemetry_summaries", "Device telemetry summaries "
                                "this replica applied.")
        f.add_metric([], c.telemetry_applied)
        yield f


class ServerMetrics:
    """The registry of one FleetServer: its process collector, the ingest histograms and the
    fleet collector over its store."""

    def __init__(self, store: Store, *, guard: DeviceMessageGuard | None = None,
                 stats: Any = None, connected: Any = None, backlog: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.counters = ProcessCounters()
        self.guard = guard
        self.stats = stats
        self.connected = connected or (lambda: False)
        self.backlog = backlog or (lambda: 0)
        self.batch_messages = Histogram(
            "deltafleet_ingest_batch_messages", "Device messages applied in one database "
            "transaction.", buckets=BATCH_BUCKETS, registry=self.registry)
        self.lag = Histogram(
            "deltafleet_ingest_lag_seconds", "From when a device stamped a message (hello, "
            "event, telemetry) to when this replica applied it; includes device clock skew.",
            buckets=LAG_BUCKETS, registry=self.registry)
        self.fleet = FleetCollector(store)
        self.registry.register(_ProcessCollector(self))
        self.registry.register(self.fleet)
        self._http: Any = None

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve /metrics on ``host:port`` in a daemon thread; returns where it listens."""
        host, port = parse_listen(listen)
        try:
            self._http, _thread = start_http_server(port, host, self.registry)
        except OSError as e:
            raise UsageError(f"metrics: cannot listen on {listen}: {e.strerror or e}") from e
        bound = self._http.server_address
        log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
