"""`make monitor` works: the demo fleet under a local Prometheus with the shipped rules, every
scrape target (server and three agents) up, and it prints where to look."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import need

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_make_monitor_runs_the_demo_fleet_under_prometheus(broker):
    need.prometheus()
    res = subprocess.run([sys.executable, "-m", "scripts.monitor", "--seconds", "6"], cwd=REPO,
                         capture_output=True, text=True, timeout=240,
                         env={**os.environ, "FLEET_MQTT_URL": broker.url,
                              "FLEET_TOPIC_PREFIX": "monitor/v1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    up = json.loads(res.stdout.strip().splitlines()[-1])["targets_up"]
    assert len(up) == 4 and all(up.values())
    for what in ("Prometheus:", "/alerts", "server:", "jetson-1:", "dashboards:"):
        assert what in res.stdout
