"""Fleet gauges, computed from the store at scrape time (a prometheus-client custom collector).

Every figure is an SQL aggregate (GROUP BY in the database; no per-device row reaches Python:
group membership is counted per distinct combination of the values the selectors name), so a
scrape costs a few queries whatever the fleet size, and every replica of the server exposes
the same numbers: they come from the one shared database, not from what each replica happened
to handle. Aggregate them across replicas with ``max without (instance)``, never ``sum``
(docs/observability.md).

No family carries a device id: devices are counted by online state, model, version, variant,
group and device type (``telemetry.device_type``); rollouts by their id, which is bounded by
listing only active rollouts and those finished within ``FINISHED_KEPT_S``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, or_, select

from deltafleet.shared.messages import TELEMETRY_LATENCY_BOUNDS_US

from ..fleet.groups import PROFILE_SELECTOR_KEYS, device_matches
from ..rollout.states import ACTIVE_ROLLOUT_STATES
from ..store import Store
from ..store.models import (
    Artifact,
    Delta,
    Device,
    DeviceModel,
    DeviceTelemetry,
    DeviceTelemetryModel,
    Group,
    Model,
    ModelVersion,
    Rollout,
    RolloutCount,
    utcnow,
)
from .telemetry import BUCKET_COLUMNS

FINISHED_KEPT_S = 24 * 3600  # finished rollouts stay in the rollout families this long
TELEMETRY_FRESH_S = 300  # a device "reports telemetry" while its last summary is this young
DELTA_RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
BUILD_SECONDS_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _bool(v: Any) -> str:
    return "true" if v else "false"


def _histogram(name: str, doc: str, labels: list[str], bounds: tuple[float, ...],
               samples: dict[tuple[str, ...], list[float]]) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=labels)
    for key, values in sorted(samples.items()):
        buckets = [(repr(b), float(sum(1 for v in values if v <= b))) for b in bounds]
        buckets.append(("+Inf", float(len(values))))
        h.add_metric(list(key), buckets, float(sum(values)))
    return h


# The summed telemetry counters, in the order of the query's first columns: (column, family,
# help).
FLEET_COUNTERS = (
    ("requests", "deltafleet_fleet_inference_requests",
     "Inference requests devices served (telemetry)."),
    ("errors", "deltafleet_fleet_inference_errors", "Requests the primary model did not answer."),
    ("fallbacks", "deltafleet_fleet_fallback_answers",
     "Answers devices gave from their fallback model."),
    ("swaps", "deltafleet_fleet_model_swaps", "Devices switching to a version (hot swaps)."),
)


class FleetCollector(Collector):
    """Collects the fleet families from ``store`` on every scrape (read-only session)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.last_seconds = 0.0

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        with self.store.read() as s:
            families = list(self._devices(s)) + list(self._rollouts(s)) + \
                list(self._deltas(s)) + list(self._telemetry(s))
        self.last_seconds = time.perf_counter() - t0
        g = GaugeMetricFamily("deltafleet_fleet_collect_seconds",
                              "Time this scrape spent reading the fleet figures from the store.")
        g.add_metric([], self.last_seconds)
        yield from families
        yield g

    # -- devices ---------------------------------------------------------------------------
    def _devices(self, s: Any) -> Iterator[Metric]:
        g = GaugeMetricFamily("deltafleet_devices", "Devices known to the server, by online "
                              "state.", labels=["online"])
        counts = dict.fromkeys(("true", "false"), 0)
        for online, n in s.execute(select(Device.online, func.count()).group_by(Device.online)):
            counts[_bool(online)] += n
        for k, n in counts.items():
            g.add_metric([k], n)
        yield g

        g = GaugeMetricFamily("deltafleet_device_models", "Devices running a model version "
                              "and variant (as their hello says), by online state.",
                              labels=["model", "version", "variant", "online"])
        for model, version, variant, online, n in s.execute(
                select(DeviceModel.model_name, DeviceModel.version, DeviceModel.variant,
                       Device.online, func.count())
                .join(Device, Device.id == DeviceModel.device_id)
                .group_by(DeviceModel.model_name, DeviceModel.version, DeviceModel.variant,
                          Device.online)):
            g.add_metric([model, version or "", variant or "", _bool(online)], n)
        yield g

        g = GaugeMetricFamily("deltafleet_group_devices", "Devices a group's selector matches, "
                              "by online state.", labels=["group", "online"])
        groups = list(s.execute(select(Group.name, Group.selector)))
        if groups:
            # GROUP BY only the fields the selectors name: one row per distinct combination of
            # those values (a handful), however many devices and however varied their labels.
            keys = sorted({k for _, sel in groups for k in (sel or {})})
            exprs = [getattr(Device, k) if k in PROFILE_SELECTOR_KEYS
                     else Device.labels[k].as_string() for k in keys]
            members: dict[tuple[str, str], int] = defaultdict(int)
            for online, *values, n in s.execute(
                    select(Device.online, *exprs, func.count())
                    .group_by(Device.online, *exprs)):
                seen = dict(zip(keys, values, strict=True))
                dev = SimpleNamespace(
                    **{k: seen.get(k) for k in PROFILE_SELECTOR_KEYS},
                    labels={k: v for k, v in seen.items()
                            if k not in PROFILE_SELECTOR_KEYS and v is not None})
                for name, selector in groups:
                    if device_matches(dev, selector or {}):  # type: ignore[arg-type]
                        members[(name, _bool(online))] += n
            for name, _ in groups:
                for online in ("true", "false"):
                    g.add_metric([name, online], members.get((name, online), 0))
        yield g

    # -- rollouts --------------------------------------------------------------------------
    def _rollouts(self, s: Any) -> Iterator[Metric]:
        g = GaugeMetricFamily("deltafleet_rollouts", "Rollouts by state.", labels=["state"])
        for state, n in s.execute(select(Rollout.state, func.count()).group_by(Rollout.state)):
            g.add_metric([state], n)
        yield g

        since = utcnow() - timedelta(seconds=FINISHED_KEPT_S)
        rows = list(s.execute(
            select(Rollout.id, Rollout.state, Rollout.current_wave, Rollout.policy, Model.name,
                   ModelVersion.version, Group.name)
            .join(Model, Model.id == Rollout.model_id)
            .join(ModelVersion, ModelVersion.id == Rollout.version_id)
            .join(Group, Group.id == Rollout.group_id)
            .where(or_(Rollout.state.in_([r.value for r in ACTIVE_ROLLOUT_STATES]),
                       Rollout.finished_at >= since))))
        info = GaugeMetricFamily("deltafleet_rollout_info", "Active rollouts and those finished "
                                 "in the last 24 h: what they roll out where (always 1).",
                                 labels=["rollout", "model", "version", "group", "state"])
        wave = GaugeMetricFamily("deltafleet_rollout_current_wave", "The wave a rollout is "
                                 "in (0 = the first).", labels=["rollout"])
        limit = GaugeMetricFamily("deltafleet_rollout_max_failure_ratio", "Failures a rollout "
                                  "allows, as a share of the devices dispatched (its "
                                  "--max-failure).", labels=["rollout"])
        for rid, state, current, policy, model, version, group in rows:
            info.add_metric([str(rid), model, version, group, state], 1)
            wave.add_metric([str(rid)], current)
            limit.add_metric([str(rid)], float((policy or {}).get("max_failure_pct", 5.0)) / 100)
        yield from (info, wave, limit)

        g = GaugeMetricFamily("deltafleet_rollout_targets", "Targets (devices) of a rollout by "
                              "wave and state (from rollout_counts).",
                              labels=["rollout", "wave", "state"])
        ids = [r[0] for r in rows]
        if ids:
            for rid, w, state, n in s.execute(
                    select(RolloutCount.rollout_id, RolloutCount.wave, RolloutCount.state,
                           RolloutCount.n)
                    .where(RolloutCount.rollout_id.in_(ids))):  # zeros too: a move shows
                g.add_metric([str(rid), str(w), state], n)
        yield g

    # -- deltas ----------------------------------------------------------------------------
    def _deltas(self, s: Any) -> Iterator[Metric]:
        ratios: dict[tuple[str, ...], list[float]] = defaultdict(list)
        seconds: dict[tuple[str, ...], list[float]] = defaultdict(list)
        for codec, size, full, built in s.execute(
                select(Delta.codec, Delta.size_bytes, Artifact.size_bytes, Delta.build_seconds)
                .outerjoin(Artifact, Artifact.sha256 == Delta.target_sha256)):
            if full:
                ratios[(codec,)].append(size / full)
            seconds[(codec,)].append(float(built or 0.0))
        yield _histogram("deltafleet_delta_ratio", "Deltas built, by size over the size of the "
                         "model they produce.", ["codec"], DELTA_RATIO_BUCKETS, ratios)
        yield _histogram("deltafleet_delta_build_seconds", "Deltas built, by how long the "
                         "build took.", ["codec"], BUILD_SECONDS_BUCKETS, seconds)

    # -- device telemetry ------------------------------------------------------------------
    def _telemetry(self, s: Any) -> Iterator[Metric]:
        t = DeviceTelemetryModel
        labels = ["model", "version", "variant", "device_type"]
        cols = [func.sum(getattr(t, c)) for c in
                ("requests", "errors", "fallbacks", "swaps", "trials_passed", "trials_failed",
                 "latency_sum_us", *BUCKET_COLUMNS, "agreement_ppm_sum", "agreement_trials")]
        rows = list(s.execute(select(t.model_name, t.version, t.variant, t.device_type, *cols)
                              .group_by(t.model_name, t.version, t.variant, t.device_type)))
        fams = {key: CounterMetricFamily(name, doc, labels=labels)
                for key, name, doc in FLEET_COUNTERS}
        verdicts = CounterMetricFamily("deltafleet_fleet_trial_verdicts", "Trial verdicts on "
                                       "devices: passed or failed (rolled back).",
                                       labels=[*labels, "verdict"])
        latency = HistogramMetricFamily("deltafleet_fleet_inference_latency_seconds",
                                        "Latency of answered inference requests on devices.",
                                        labels=labels)
        agreement = GaugeMetricFamily("deltafleet_fleet_trial_output_agreement_ratio", "Mean, "
                                      "over the trials of a version, of the share of its answers "
                                      "agreeing with the previous version's on the same inputs.",
                                      labels=labels)
        nb = len(BUCKET_COLUMNS)
        for model, version, variant, kind, *v in rows:
            key = [model, version, variant or "", kind or ""]
            for i, name in enumerate(fams):
                fams[name].add_metric(key, float(v[i] or 0))
            verdicts.add_metric([*key, "passed"], float(v[4] or 0))
            verdicts.add_metric([*key, "failed"], float(v[5] or 0))
            acc = 0
            buckets = []
            agreed, trials = v[7 + nb:]
            if trials:
                agreement.add_metric(key, float(agreed or 0) / float(trials) / 1e6)
            for bound, n in zip((*TELEMETRY_LATENCY_BOUNDS_US, None), v[7:7 + nb], strict=True):
                acc += int(n or 0)
                buckets.append(("+Inf" if bound is None else repr(bound / 1e6), float(acc)))
            latency.add_metric(key, buckets, float(v[6] or 0) / 1e6)
        yield from fams.values()
        yield verdicts
        yield latency
        yield agreement

        fresh = utcnow() - timedelta(seconds=TELEMETRY_FRESH_S)
        n_dev = GaugeMetricFamily("deltafleet_fleet_telemetry_devices", "Devices whose last "
                                  "telemetry summary is under 5 minutes old.",
                                  labels=["device_type"])
        rss_max = GaugeMetricFamily("deltafleet_fleet_agent_memory_rss_max_bytes", "Largest "
                                    "agent resident memory among those devices.",
                                    labels=["device_type"])
        rss_avg = GaugeMetricFamily("deltafleet_fleet_agent_memory_rss_avg_bytes", "Mean "
                                    "agent resident memory among those devices.",
                                    labels=["device_type"])
        d = DeviceTelemetry
        for kind, n, mx, avg in s.execute(
                select(d.device_type, func.count(), func.max(d.rss_bytes), func.avg(d.rss_bytes))
                .where(d.received_at >= fresh).group_by(d.device_type)):
            n_dev.add_metric([kind], n)
            rss_max.add_metric([kind], float(mx or 0))
            rss_avg.add_metric([kind], float(avg or 0))
        yield from (n_dev, rss_max, rss_avg)
