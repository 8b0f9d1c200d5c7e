"""The metrics cost benchmark can fail: a scrape that misses devices (their telemetry deleted
behind its back) is a failed run (exit 1, ``"ok": false``, the family named); the same run
without the fault passes and reports both costs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*flags: str) -> tuple[int, dict]:
    res = subprocess.run([sys.executable, "-m", "scripts.bench.metrics_cost", "--devices", "200",
                          "--scrapes", "2", *flags], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.stdout, res.stderr[-2000:]
    return res.returncode, json.loads(res.stdout)


def test_a_scrape_missing_devices_fails_the_benchmark():
    code, doc = run("--drop-telemetry", "3")
    assert code == 1 and doc["ok"] is False
    assert doc["failures"] == ["deltafleet_fleet_telemetry_devices is 197, not 200"]


def test_the_benchmark_passes_and_reports_both_costs():
    code, doc = run()
    assert code == 0 and doc["ok"] is True, doc["failures"]
    assert doc["devices"] == 200 and doc["scrape_cpu_ms"]["max"] > 0
    assert 0 < doc["telemetry"]["bytes_per_device_minute"] < 1024
