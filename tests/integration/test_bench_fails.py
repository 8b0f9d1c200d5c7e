"""The fleet-scale benchmark can fail: one simulated device that cannot apply the artifact makes
the fan-out run a failure (exit status 1, ``"ok": false``, the failed device named), counted
both in the store and on the devices; the same run without it passes. Smallest configuration:
one fan-out of 10 devices, its own Mosquitto and ``fleetctl server``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.broker import has_mosquitto
from tests.harness.need import missing

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]


def fanout(*flags: str) -> tuple[int, dict]:
    if not has_mosquitto():
        missing("mosquitto")
    res = subprocess.run([sys.executable, "-m", "scripts.bench.fleet_scale", "--only", "fanout",
                          "--devices", "10", "--timeout-s", "60", *flags],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.stdout, res.stderr[-2000:]
    return res.returncode, json.loads(res.stdout)


def test_fanout_with_a_failing_device_is_a_failed_run() -> None:
    code, doc = fanout("--fail-devices", "1")
    assert code == 1
    assert doc["ok"] is False
    run = doc["fanout"][0]
    assert run["ok"] is False
    assert run["targets_healthy_on_target_in_store"] == 9
    assert run["devices_running_target"] == 9
    assert run["targets_by_state"].get("failed") == 1
    assert "s_to_all_healthy" not in run  # no figure for a run that did not get there
    assert any("cam-00000" in f for f in run["failures"])
    assert any(f.startswith("store: 9 of 10") for f in run["failures"])


def test_fanout_where_every_device_ends_healthy_passes() -> None:
    code, doc = fanout()
    assert code == 0, doc["failures"]
    run = doc["fanout"][0]
    assert run["ok"] is True
    assert run["targets_healthy_on_target_in_store"] == run["devices_running_target"] == 10
    assert run["s_to_all_healthy"] > 0
    assert run["broker_peak_rss_mb"] > 0 and run["server_peak_rss_mb"] > 0
