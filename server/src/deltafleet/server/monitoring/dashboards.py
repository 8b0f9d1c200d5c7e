"""The Grafana dashboards, as code: ``python -m deltafleet.server.monitoring.dashboards``
writes ``dashboards/*.json`` (``--check`` exits 1 when the files differ from what this module
makes; a test runs it).

Four dashboards: fleet overview, a rollout (``$rollout``), device health and inference
(``$model``), delivery (bytes and deltas). Each has a ``$datasource`` variable (any Prometheus
datasource). Queries follow docs/observability.md: fleet figures (from the store, the same on
every server replica) are deduplicated with ``max without (instance)``; per-replica counters
are summed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from . import DASHBOARDS_DIR

DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39


def fleet(expr: str) -> str:
    """A fleet family deduplicated across replicas."""
    return f"max without (instance) ({expr})"


class _Board:
    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[dict[str, Any]] = []
        self.variables: list[dict[str, Any]] = [{
            "name": "datasource", "label": "Prometheus", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
            "options": []}]
        self._x = self._y = 0

    def variable(self, name: str, label: str, query: str, *, include_all: bool = False) -> None:
        self.variables.append({
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "definition": query, "refresh": 2, "sort": 3, "hide": 0, "current": {},
            "includeAll": include_all, "multi": include_all,
            **({"allValue": ".+"} if include_all else {}), "options": [], "regex": ""})

    def panel(self, title: str, kind: str, targets: list[tuple[str, str]], *, unit: str = "short",
              width: int = 12, height: int = 8, description: str = "") -> None:
        if self._x + width > 24:
            self._x, self._y = 0, self._y + height
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": DS,
            "gridPos": {"x": self._x, "y": self._y, "w": width, "h": height},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind ==
            "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr,
                         "legendFormat": legend, **({"instant": True} if kind in
                                                    ("stat", "bargauge", "table") else {})}
                        for i, (expr, legend) in enumerate(targets)],
        }
        self.panels.append(panel)
        self._x += width

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["deltafleet"], "timezone": "browser", "schemaVersion": SCHEMA_VERSION,
            "version": 1, "editable": True, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": self.variables}, "annotations": {"list": []},
            "panels": self.panels,
        }


RATE = "$__rate_interval"


def overview() -> _Board:
    b = _Board("deltafleet-fleet", "deltafleet fleet overview",
               "Devices, groups, rollouts and the health of the device traffic.")
    b.panel("Devices online", "stat", [(fleet('deltafleet_devices{online="true"}'), "online")],
            width=6, height=4)
    b.panel("Devices offline", "stat", [(fleet('deltafleet_devices{online="false"}'), "offline")],
            width=6, height=4)
    b.panel("Rollouts by state", "stat",
            [(f"sum by (state) ({fleet('deltafleet_rollouts')})", "{{state}}")],
            width=12, height=4)
    b.panel("Devices by model version", "timeseries",
            [(f"sum by (model, version) ({fleet('deltafleet_device_models')})",
              "{{model}} {{version}}")])
    b.panel("Devices per group", "bargauge",
            [(f"sum by (group, online) ({fleet('deltafleet_group_devices')})",
              "{{group}} online={{online}}")])
    b.panel("Inference requests/s by model", "timeseries",
            [(f"sum by (model) ({fleet(f'rate(deltafleet_fleet_inference_requests_total[{RATE}])')})",
              "{{model}}")], unit="reqps")
    b.panel("Refused device messages", "timeseries",
            [(f"sum by (reason) (rate(deltafleet_device_messages_refused_total[{RATE}]))",
              "{{reason}}"), ("sum(deltafleet_suspect_devices)", "suspect devices")],
            description="Messages the servers refused, by reason (server/guard.py); suspect "
                        "devices are named in the server log.")
    b.panel("Server replicas connected to the broker", "stat",
            [("sum(deltafleet_broker_connected)", "connected")], width=8, height=4)
    b.panel("Ingest backlog", "timeseries",
            [("sum by (instance) (deltafleet_ingest_backlog_messages)", "{{instance}}")],
            width=8, height=4)
    b.panel("Server build", "table", [("deltafleet_build_info", "{{version}}")], width=8,
            height=4)
    return b


def rollout() -> _Board:
    b = _Board("deltafleet-rollout", "deltafleet rollout",
               "One rollout: its targets by state and wave, its failures against its threshold.")
    b.variable("rollout", "Rollout", "label_values(deltafleet_rollout_info, rollout)")
    r = 'rollout="$rollout"'
    b.panel("Rollout", "table",
            [(fleet(f"deltafleet_rollout_info{{{r}}}"),
              "{{model}} {{version}} to {{group}}: {{state}}")], width=16, height=4)
    b.panel("Current wave", "stat", [(fleet(f"deltafleet_rollout_current_wave{{{r}}}"), "wave")],
            width=8, height=4)
    b.panel("Targets by state", "timeseries",
            [(f"sum by (state) ({fleet(f'deltafleet_rollout_targets{{{r}}}')})", "{{state}}")],
            description="Devices of the rollout per state; a rollout whose waiting targets stop "
                        "moving raises DeltafleetRolloutStalled.")
    b.panel("Targets by wave", "bargauge",
            [(f"sum by (wave, state) ({fleet(f'deltafleet_rollout_targets{{{r}}}')})",
              "wave {{wave}} {{state}}")])
    failed = fleet(f'deltafleet_rollout_targets{{{r},state=~"failed|rejected|rolled_back|held"}}')
    dispatched = fleet(f'deltafleet_rollout_targets{{{r},state!~"pending|skipped|cancelled"}}')
    b.panel("Failure ratio and threshold", "timeseries",
            [(f"(sum({failed}) or vector(0)) / sum({dispatched})", "failure ratio"),
             (f"max({fleet(f'deltafleet_rollout_max_failure_ratio{{{r}}}')})", "threshold")],
            unit="percentunit", width=24,
            description="Failed, rejected, rolled back or held devices over those dispatched; "
                        "over the threshold the rollout pauses or aborts (its --on-failure).")
    return b


def device_health() -> _Board:
    b = _Board("deltafleet-devices", "deltafleet device health and inference",
               "What devices report in their telemetry: requests, errors, fallback answers, "
               "latency, swaps, trial verdicts, memory; by model, version, variant and device "
               "type.")
    b.variable("model", "Model", "label_values(deltafleet_fleet_inference_requests_total, model)",
               include_all=True)
    m = 'model=~"$model"'

    def rate(name: str) -> str:
        return fleet(f"rate({name}{{{m}}}[{RATE}])")

    def by_version(name: str) -> str:
        return f"sum by (model, version) ({rate(name)})"

    requests = by_version("deltafleet_fleet_inference_requests_total")
    each = "{{model}} {{version}}"
    b.panel("Requests/s by version", "timeseries", [(requests, each)], unit="reqps")
    b.panel("Errors by version", "timeseries",
            [(f"{by_version('deltafleet_fleet_inference_errors_total')} / {requests}", each)],
            unit="percentunit", description="Share of requests the primary model did not answer.")
    b.panel("Fallback answers", "timeseries",
            [(by_version("deltafleet_fleet_fallback_answers_total"), each)], unit="reqps")
    b.panel("Latency p50 / p95 by version", "timeseries",
            [(f"histogram_quantile(0.5, sum by (le, model, version) "
              f"({rate('deltafleet_fleet_inference_latency_seconds_bucket')}))",
              "p50 {{model}} {{version}}"),
             (f"histogram_quantile(0.95, sum by (le, model, version) "
              f"({rate('deltafleet_fleet_inference_latency_seconds_bucket')}))",
              "p95 {{model}} {{version}}")], unit="s")
    b.panel("Requests/s by variant and device type", "timeseries",
            [(f"sum by (variant, device_type) ({rate('deltafleet_fleet_inference_requests_total')})",
              "{{variant}} on {{device_type}}")], unit="reqps")
    b.panel("Swaps and trial verdicts", "timeseries",
            [(f"sum by (version) ({fleet(f'increase(deltafleet_fleet_model_swaps_total{{{m}}}[1h])')})",
              "swaps to {{version}}"),
             (f"sum by (version, verdict) "
              f"({fleet(f'increase(deltafleet_fleet_trial_verdicts_total{{{m}}}[1h])')})",
              "trials {{verdict}} {{version}}")])
    b.panel("Trial output agreement by version", "timeseries",
            [(f"max by (model, version) "
              f"({fleet(f'deltafleet_fleet_trial_output_agreement_ratio{{{m}}}')})",
              "{{model}} {{version}}")], unit="percentunit",
            description="Mean over trials: share of the new version's answers that agree with "
                        "the previous version's on the same inputs (top class, else values "
                        "within 0.1%). Reported, not judged.")
    b.panel("Agent memory (RSS)", "timeseries",
            [(f"max by (device_type) ({fleet('deltafleet_fleet_agent_memory_rss_max_bytes')})",
              "max {{device_type}}"),
             (f"max by (device_type) ({fleet('deltafleet_fleet_agent_memory_rss_avg_bytes')})",
              "mean {{device_type}}")], unit="bytes")
    b.panel("Devices reporting telemetry", "stat",
            [(f"sum by (device_type) ({fleet('deltafleet_fleet_telemetry_devices')})",
              "{{device_type}}")])
    return b


def delivery() -> _Board:
    b = _Board("deltafleet-delivery", "deltafleet delivery: bytes and deltas",
               "What the servers publish (full artifacts, deltas, repairs), how small the "
               "deltas are and how long they take to build, and the ingest path.")
    b.panel("Bytes published/s by kind", "timeseries",
            [(f"sum by (kind) (rate(deltafleet_published_bytes_total[{RATE}]))", "{{kind}}")],
            unit="Bps")
    b.panel("Bytes published by kind (total)", "bargauge",
            [("sum by (kind) (deltafleet_published_bytes_total)", "{{kind}}")], unit="bytes")
    b.panel("Delta size over model size", "timeseries",
            [(f"sum by (codec) ({fleet('deltafleet_delta_ratio_sum')}) / "
              f"sum by (codec) ({fleet('deltafleet_delta_ratio_count')})", "mean {{codec}}")],
            unit="percentunit",
            description="Mean size of the deltas built over the model they produce; "
                        "DeltafleetDeltaRatioRegression fires when recent ones grow.")
    b.panel("Delta build seconds (p95)", "timeseries",
            [(f"histogram_quantile(0.95, sum by (le, codec) "
              f"({fleet('deltafleet_delta_build_seconds_bucket')}))", "{{codec}}")], unit="s")
    b.panel("Ingest batch size (p95)", "timeseries",
            [(f"histogram_quantile(0.95, sum by (le) "
              f"(rate(deltafleet_ingest_batch_messages_bucket[{RATE}])))", "p95")])
    b.panel("Ingest lag (p95)", "timeseries",
            [(f"histogram_quantile(0.95, sum by (le) "
              f"(rate(deltafleet_ingest_lag_seconds_bucket[{RATE}])))", "p95")], unit="s",
            description="From the device's timestamp to the commit (includes clock skew).")
    b.panel("Database and broker errors", "timeseries",
            [(f"sum by (kind) (rate(deltafleet_database_errors_total[{RATE}]))", "db {{kind}}"),
             (f"sum(rate(deltafleet_broker_disconnects_total[{RATE}]))", "broker disconnects")],
            width=24)
    return b


BOARDS = {"fleet-overview": overview, "rollout": rollout, "device-health": device_health,
          "delivery": delivery}


def build() -> dict[str, dict[str, Any]]:
    """File name (without .json) -> dashboard JSON."""
    return {name: make().to_json() for name, make in BOARDS.items()}


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    out = Path(next((a for a in args if not a.startswith("--")), DASHBOARDS_DIR))
    stale = []
    for name, board in build().items():
        path = out / f"{name}.json"
        text = render(board)
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"dashboards differ from the code: {', '.join(stale)}; run `python -m "
              "deltafleet.server.monitoring.dashboards`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
