"""Device views tell the truth: after a failed and after an aborted update, ``fleetctl device
list --json`` and ``device show`` say the device runs what it reported (v1, like the device
itself says) and, apart, what it was asked to run (v2, by which rollout) and why it does not.

fleetctl runs as a user runs it: the installed console script in a subprocess, against a live
(in-process) server with simulated devices on a real broker."""

from __future__ import annotations

import json
import subprocess

import pytest

from deltafleet.shared import sha256_file
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker

FAST = {"health_window_s": 1, "retry_backoff_s": 1, "state_timeout_s": 60}


@pytest.fixture
def lab(rollout_lab, onnx_pair) -> RolloutLab:
    return rollout_lab(onnx_pair(0.3))


def fleetctl(lab: RolloutLab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.fleetctl(*args, columns=80, timeout_s=60)


def assert_runs_v1_asked_v2(lab: RolloutLab, device_id: str, rid: int,
                            states: set[str]) -> dict:
    v1_sha = sha256_file(lab.files["v1"])
    assert lab.fleet.devices[device_id].models["detector"].version == "v1"  # the device's word
    res = fleetctl(lab, "device", "list", "--json")
    assert res.returncode == 0, res.stderr
    (shown,) = [d for d in json.loads(res.stdout) if d["id"] == device_id]
    (running,) = shown["running"]
    assert (running["model"], running["version"], running["sha256"]) == ("detector", "v1",
                                                                          v1_sha)
    assert shown["models"] == shown["running"]
    (asked,) = shown["desired"]
    assert (asked["model"], asked["version"], asked["rollout_id"]) == ("detector", "v2", rid)
    assert asked["state"] in states and asked["why"], asked
    assert asked["sha256"] == sha256_file(lab.files["v2"])

    res = fleetctl(lab, "device", "show", device_id)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    runs, _, asked_part = text.partition("asked to run")
    assert "detector  v1" in runs and "v2" not in runs.split("runs (as the device reported)")[1]
    assert "detector  v2" in asked_part and f"  {rid}  " in asked_part
    assert asked["state"] in asked_part
    listed = fleetctl(lab, "device", "list").stdout
    (line,) = [x for x in listed.splitlines() if x.startswith(device_id)]
    assert "detector:v1" in line and f"v2 r{rid} {asked['state']}" in line
    return shown


def test_a_failed_update_shows_the_old_version_running_and_the_new_one_asked(lab):
    (dev,) = lab.add_devices(1, {"hw": "jetson"})
    lab.fleet.devices[dev].knobs.fail_health = True
    lab.group("jetson", hw="jetson")
    rid = lab.rollout("v2", "jetson", max_attempts=1, **FAST)
    data = lab.wait_state(rid, {"paused"}, 60)
    (target,) = data["targets"]
    assert target["state"] == "rolled_back", target
    shown = assert_runs_v1_asked_v2(lab, dev, rid, {"rolled_back"})
    (asked,) = shown["desired"]
    assert asked["open"] is True and "error rate" in asked["why"]
    wide = fleetctl(lab, "device", "show", dev, "--wide").stdout
    assert "injected health failure: error rate 40%" in wide
    assert sha256_file(lab.files["v1"]) in wide


def test_an_aborted_update_shows_the_old_version_running_and_the_ask_withdrawn(lab):
    ids = lab.add_devices(3, {"hw": "jetson"})
    lab.fleet.devices[ids[0]].knobs.fail_apply = True
    lab.group("jetson", hw="jetson")
    rid = lab.rollout("v2", "jetson", canary="1", on_failure="abort", max_attempts=1, **FAST)
    lab.wait_state(rid, {"aborted"}, 60)
    shown = assert_runs_v1_asked_v2(lab, ids[0], rid, {"failed", "rejected", "rolled_back"})
    (asked,) = shown["desired"]
    assert asked["open"] is False and asked["rollout_state"] == "aborted"
    assert "(rollout aborted)" in asked["why"]
    others = {d["id"]: d for d in json.loads(fleetctl(lab, "device", "list", "--json").stdout)}
    for other in ids[1:]:  # never sent a manifest: they run v1 and were asked nothing they run
        assert [m["version"] for m in others[other]["running"]] == ["v1"]
