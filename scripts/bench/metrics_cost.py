"""What observability costs: server CPU per /metrics scrape with N devices in the store, and
the bytes of device telemetry per device and minute.

    .venv/bin/python -m scripts.bench.metrics_cost [--devices 10000] [--scrapes 10]
        [--models 2] [--interval-s 60] [--targets scripts/bench/targets.json]

Scrape: a SQLite store with ``--devices`` devices (each running a model version, in groups,
every one a target of a rollout, every one with a telemetry summary applied through the
server's own path) and the registry of a real ``FleetServer``; each scrape is
``generate_latest`` of that registry, timed in process CPU (the scrape runs in this process,
so that is the server's CPU). The benchmark FAILS (``"ok": false``) when a scrape does not
account for every device: devices, devices per model, group members, rollout targets, devices
reporting telemetry and the summed requests must all equal what was stored.

Telemetry: one summary from the agent's own ``TelemetryRecorder`` with ``--models`` served
(model, version) entries after 10,000 requests each, encoded as sent, on a device that served
``--past-versions`` earlier versions of the first model since it started (their final counts
already acknowledged: a summary leaves out entries unchanged since); per minute it costs the
MQTT PUBLISH (fixed header, topic, packet id, payload) and its PUBACK, and the server's ack
(PUBLISH + PUBACK), every ``--interval-s``.

Targets (``targets.json``, key ``metrics_cost``): ``scrape_cpu_ms_max`` (the slowest scrape)
and ``telemetry_bytes_per_device_minute_max``; a missed target is reported, not failed.
``BENCH_QUICK=1`` uses 1,000 devices; ``BENCH_METRICS_DEVICES`` sets the size.
``--drop-telemetry K`` (a test fault) deletes the telemetry of K devices behind the scrape's
back: the run must then fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from deltafleet.agent.telemetry import TelemetryRecorder
from deltafleet.server import catalog, fleet
from deltafleet.server.config import ServerConfig
from deltafleet.server.daemon import FleetServer
from deltafleet.server.metrics import apply_telemetry
from deltafleet.server.policy import RolloutPolicy
from deltafleet.server.rollouts import create_rollout
from deltafleet.server.store import Store
from deltafleet.server.store.models import DeviceTelemetry, utcnow
from deltafleet.shared import Ack, Hello, ModelState, Topics, encode, sha256_file
from scripts.bench.offline_store import offline_store
from tests.harness.modelgen import make_onnx_pair

HERE = Path(__file__).resolve().parent


def mqtt_publish_bytes(topic: str, payload: bytes, qos: int = 1) -> int:
    """Bytes of an MQTT 3.1.1 PUBLISH on the wire: fixed header, topic, packet id, payload."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3
    return 1 + length_bytes + remaining


def telemetry_cost(models: int, interval_s: float, past_versions: int = 2) -> dict[str, object]:
    rec = TelemetryRecorder("jetson-00042")
    for p in range(past_versions):  # served, summarised and acknowledged before this minute
        for k in range(10_000):
            rec.record("detector", f"v{p}", latency_us=800 + k % 9000, error=k % 997 == 0,
                       fallback=False)
        rec.acked(rec.summary(lambda m, v: "int8-jetson").seq)
    for i in range(models):
        for k in range(10_000):
            rec.record("detector" if i == 0 else f"model-{i}", f"v{i + 2}", latency_us=800 + k % 9000,
                       error=k % 997 == 0, fallback=k % 1999 == 0)
    summary = rec.summary(lambda m, v: "int8-jetson")
    if len(summary.models) != models:  # the served entries, and only those
        raise SystemExit(f"summary carries {len(summary.models)} entries, not {models}")
    payload = encode(summary)
    topics = Topics("deltafleet/v1")
    up = mqtt_publish_bytes(topics.telemetry(summary.device_id), payload) + 4  # + PUBACK
    ack = encode(Ack(summary.device_id, (summary.telemetry_id,)))
    down = mqtt_publish_bytes(topics.ack(summary.device_id), ack) + 4
    per_minute = (up + down) * 60 / interval_s
    return {"models": models, "past_versions": past_versions, "interval_s": interval_s,
            "payload_bytes": len(payload),
            "publish_bytes": up, "ack_bytes": down,
            "bytes_per_device_minute": round(per_minute, 1)}


def build_store(root: Path, n: int, model: Path) -> tuple[ServerConfig, Store, int]:
    cfg, store, blobs = offline_store(root)
    sha = sha256_file(model)
    hws = ("jetson", "rpi", "x86")
    hellos = [Hello(f"d{i:05d}", "1.0", {"arch": "aarch64" if i % 3 < 2 else "x86_64",
                                           "accelerator": "cuda" if i % 3 == 0 else "none",
                                           "runtimes": {"onnxruntime": "1.20"}},
                    {"hw": hws[i % 3], "site": f"site-{i % 40}", "serial": f"SN{i:07d}"},
                    (ModelState("detector", "v1", sha),))
              for i in range(n)]
    with store.session() as s:
        catalog.add_model_version(s, blobs, "detector", "v2", model)
        fleet.upsert_devices_from_hellos(s, hellos, utcnow())
        fleet.create_group(s, "all", {})
        for hw in hws:
            fleet.create_group(s, hw, {"hw": hw})
    with store.session() as s:
        create_rollout(s, "detector:v2", "all", "bench", policy=RolloutPolicy(state_timeout_s=3600))
    requests = 0
    for start in range(0, n, 1000):
        batch = []
        for i in range(start, min(n, start + 1000)):
            rec = TelemetryRecorder(f"d{i:05d}")
            for _ in range(1 + i % 5):
                rec.record("detector", "v1", latency_us=1500, error=False, fallback=False)
            requests += 1 + i % 5
            batch.append(rec.summary(lambda m, v: "default"))
        with store.session() as s:
            applied = apply_telemetry(s, batch, utcnow())
        assert len(applied) == len(batch)
    return cfg, store, requests


def check(text: str, n: int, requests: int) -> list[str]:
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def total(name: str, **match: str) -> float:
        f = fams.get(name)
        return sum(s.value for s in f.samples if s.name in (name, f"{name}_total")
                   and all(s.labels.get(k) == v for k, v in match.items())) if f else -1

    want = {
        "deltafleet_devices": (total("deltafleet_devices"), n),
        "deltafleet_device_models": (total("deltafleet_device_models", version="v1"), n),
        "deltafleet_group_devices{group=all}": (total("deltafleet_group_devices", group="all"), n),
        "deltafleet_group_devices{group=~jetson|rpi|x86}": (
            sum(total("deltafleet_group_devices", group=g) for g in ("jetson", "rpi", "x86")), n),
        "deltafleet_rollout_targets": (total("deltafleet_rollout_targets"), n),
        "deltafleet_fleet_telemetry_devices": (total("deltafleet_fleet_telemetry_devices"), n),
        "deltafleet_fleet_inference_requests_total": (
            total("deltafleet_fleet_inference_requests"), requests),
    }
    return [f"{name} is {got:g}, not {expected}" for name, (got, expected) in want.items()
            if got != expected]


def main() -> int:
    p = argparse.ArgumentParser()
    quick = os.environ.get("BENCH_QUICK") == "1"
    p.add_argument("--devices", type=int,
                   default=int(os.environ.get("BENCH_METRICS_DEVICES") or (1000 if quick else 10_000)))
    p.add_argument("--scrapes", type=int, default=5 if quick else 10)
    p.add_argument("--models", type=int, default=2)
    p.add_argument("--past-versions", type=int, default=2,
                   help="earlier versions the device served since it started")
    p.add_argument("--interval-s", type=float, default=60.0)
    p.add_argument("--targets", type=Path, default=HERE / "targets.json")
    p.add_argument("--drop-telemetry", type=int, default=0, help=argparse.SUPPRESS)
    opts = p.parse_args()
    targets = json.loads(opts.targets.read_text()).get("metrics_cost", {}) \
        if opts.targets.exists() else {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        root = Path(tmp)
        v1, _ = make_onnx_pair(root / "models", size_mb=0.2)
        t0 = time.monotonic()
        cfg, store, requests = build_store(root, opts.devices, v1)
        setup_s = time.monotonic() - t0
        if opts.drop_telemetry:
            with store.session() as s:
                s.execute(delete(DeviceTelemetry).where(DeviceTelemetry.device_id.in_(
                    [f"d{i:05d}" for i in range(opts.drop_telemetry)])))
        server = FleetServer(cfg, store)
        cpu_ms: list[float] = []
        text = ""
        for _ in range(opts.scrapes):
            c0 = time.process_time()
            text = generate_latest(server.metrics.registry).decode()
            cpu_ms.append((time.process_time() - c0) * 1000)
        failures += check(text, opts.devices, requests)
        server.deltas.shutdown()
        store.dispose()
    tel = telemetry_cost(opts.models, opts.interval_s, opts.past_versions)
    figures = {"scrape_cpu_ms_max": max(cpu_ms),
               "telemetry_bytes_per_device_minute_max": tel["bytes_per_device_minute"]}
    met = {k: figures[k] <= limit for k, limit in targets.items() if k in figures}
    doc = {
        "bench": "metrics_cost", "ok": not failures, "failures": failures,
        "devices": opts.devices, "setup_s": round(setup_s, 1),
        "scrape_cpu_ms": {"median": round(statistics.median(cpu_ms), 1),
                          "max": round(max(cpu_ms), 1), "runs": len(cpu_ms)},
        "exposition_bytes": len(text.encode()), "exposition_series": sum(
            1 for line in text.splitlines() if line and not line.startswith("#")),
        "telemetry": tel,
        "targets": {**targets, "met": met, "all_met": all(met.values()) if met else None},
    }
    print(json.dumps(doc, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
