"""Rollout orchestration against 50+ simulated devices on a real Mosquitto, with the real
server (controller, delta builder, chunk delivery) running in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet.shared import sha256_file
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker

N = 50
FAST = {"health_window_s": 1, "retry_backoff_s": 1, "state_timeout_s": 60}


@pytest.fixture
def models(onnx_pair) -> dict[str, Path]:
    return onnx_pair(0.3)


@pytest.fixture
def lab(rollout_lab, models) -> RolloutLab:
    return rollout_lab(models)


def problems(data: dict) -> list[tuple[str, str, str]]:
    return [(t["device"], t["state"], t["reason"]) for t in data["targets"]
            if t["state"] != "healthy"]


def jetsons(lab: RolloutLab) -> list[str]:
    """N devices labelled hw=jetson and the group "jetson" that holds them; their ids."""
    ids = lab.add_devices(N, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    return ids


def runs(lab: RolloutLab, device_id: str) -> str:
    return lab.fleet.devices[device_id].models["detector"].version


def test_canary_failure_pauses_and_later_waves_never_receive_the_model(lab):
    ids = jetsons(lab)
    for device_id in ids[:5]:  # the canary wave: sorted ids, first 5
        lab.fleet.devices[device_id].knobs.fail_health = True
    rid = lab.rollout("v2", "jetson", canary="5", waves=(50.0, 100.0), **FAST)
    data = lab.wait_state(rid, {"paused", "completed"})
    assert data["state"] == "paused"
    assert "failed" in data["state_reason"]
    later = [t for t in data["targets"] if t["wave"] > 0]
    assert later and all(t["state"] == "pending" for t in later)
    assert all(not lab.fleet.devices[t["device"]].manifests for t in later)
    lab.wait_for(lambda: all(t["state"] == "held" for t in lab.status(rid)["targets"]
                             if t["wave"] == 0), 30, "every canary to report its trial")
    assert all(runs(lab, d) == "v1" for d in ids)  # the canaries rolled themselves back
    assert lab.status(rid)["state"] == "paused"  # holds do not retry while paused


def test_healthy_rollout_completes_all_waves_in_order(lab):
    ids = jetsons(lab)
    rid = lab.rollout("v2", "jetson", canary="5", waves=(50.0, 100.0), **FAST)
    data = lab.wait_state(rid, {"completed", "paused"}, 120)
    assert data["state"] == "completed", problems(data)
    assert all(runs(lab, d) == "v2" for d in ids)
    wave_of = {t["device"]: t["wave"] for t in data["targets"]}
    assert sorted(set(wave_of.values())) == [0, 1, 2]
    def healthy_at(d: str) -> float:
        return max(at for state, at in lab.fleet.devices[d].timeline if state == "healthy")

    for wave in (0, 1):  # a wave opens only after the previous one proved healthy
        done = max(healthy_at(d) for d in ids if wave_of[d] == wave)
        opened = min(lab.fleet.devices[d].manifests[0].at for d in ids if wave_of[d] == wave + 1)
        assert done <= opened
    assert all(t["artifact"] == "delta" for t in data["targets"])


def test_rollback_returns_every_touched_device_to_v1(lab):
    ids = jetsons(lab)
    rid = lab.rollout("v2", "jetson", waves=(20.0, 100.0), **FAST)
    lab.wait_state(rid, {"completed"}, 120)
    assert all(runs(lab, d) == "v2" for d in ids)
    assert lab.act(rid, "rollback") is True
    assert lab.act(rid, "rollback") is False  # idempotent
    data = lab.wait_state(rid, {"rolled_back"}, 120)
    assert all(t["state"] == "reverted" for t in data["targets"])
    assert all(runs(lab, d) == "v1" for d in ids)
    v1 = sha256_file(lab.files["v1"])
    assert all(t["running_sha256"] == v1 for t in data["targets"])


def test_offline_device_converges_after_reconnect(lab):
    ids = jetsons(lab)
    sleeper = lab.fleet.devices[ids[-1]]
    sleeper.go_offline()
    lab.wait_for(lambda: not lab.device_online(ids[-1]), 10, "the server to see it offline")
    rid = lab.rollout("v2", "jetson", **FAST)
    lab.wait_for(lambda: sum(t["state"] == "healthy" for t in lab.status(rid)["targets"]) == N - 1,
                 120, "online devices healthy")
    assert lab.status(rid)["state"] == "running"  # waits for the offline one, does not fail it
    sleeper.come_online()
    data = lab.wait_state(rid, {"completed"}, 60)
    assert runs(lab, ids[-1]) == "v2"
    assert all(t["state"] == "healthy" for t in data["targets"])


def test_device_labelled_into_the_group_mid_rollout_gets_v2(lab):
    lab.add_devices(N, {"hw": "jetson"})
    (late,) = lab.add_devices(1, {"hw": "rpi"}, prefix="late")
    lab.group("jetson", hw="jetson")
    rid = lab.rollout("v2", "jetson", canary="5", waves=(100.0,), **FAST)
    lab.wait_for(lambda: lab.status(rid)["counts"].get("healthy", 0) >= 5, 60, "canary healthy")
    lab.fleet.devices[late].relabel({"hw": "jetson"})
    data = lab.wait_state(rid, {"completed"}, 120)
    assert late in {t["device"] for t in data["targets"]}
    assert runs(lab, late) == "v2"


def test_device_that_keeps_failing_is_held_out_instead_of_retried_in_a_storm(lab):
    ids = jetsons(lab)
    bad = lab.fleet.devices[ids[7]]
    bad.knobs.fail_apply = True
    rid = lab.rollout("v2", "jetson", max_failure_pct=10.0, max_attempts=3, **FAST)
    data = lab.wait_state(rid, {"completed", "paused"}, 120)
    assert data["state"] == "completed", problems(data)
    (target,) = [t for t in data["targets"] if t["device"] == ids[7]]
    assert target["state"] == "failed" and "held out after 3" in target["reason"]
    assert len(bad.manifests) == 3  # one per attempt, with growing holds between them
    gaps = [b.at - a.at for a, b in zip(bad.manifests, bad.manifests[1:], strict=False)]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0
    assert "1 device(s) did not update" in data["state_reason"]


def test_device_waiting_for_disk_space_uses_no_attempt_and_finishes_by_itself(lab):
    ids = jetsons(lab)
    full = lab.fleet.devices[ids[3]]
    full.knobs.disk_full = True
    rid = lab.rollout("v2", "jetson", max_failure_pct=0.0, max_attempts=1, **FAST)

    def waiting():
        (t,) = [t for t in lab.status(rid)["targets"] if t["device"] == ids[3]]
        return t if t["reason"].startswith("waiting on the device: not enough disk") else None

    target = lab.wait_for(waiting, 60, "the device's waiting reason")
    assert target["state"] in ("notified", "downloading")
    assert target["attempts"] <= 1
    lab.wait_for(lambda: sum(runs(lab, d) == "v2" for d in ids) == N - 1, 90, "the others")
    data = lab.status(rid)
    assert data["state"] == "running"  # not paused: waiting is no failure
    full.knobs.disk_full = False  # space is back
    data = lab.wait_state(rid, {"completed", "paused"}, 90)
    assert data["state"] == "completed", problems(data)
    assert runs(lab, ids[3]) == "v2" and len(full.manifests) == 1  # no re-send needed


def test_controller_restarted_mid_rollout_carries_on(lab):
    ids = jetsons(lab)
    rid = lab.rollout("v2", "jetson", canary="5", waves=(50.0, 100.0), **FAST)
    lab.wait_for(lambda: lab.status(rid)["current_wave"] >= 1, 60, "wave 2 opened")
    lab.stop_server()
    frozen = lab.status(rid)
    assert frozen["state"] == "running"
    lab.start_server()
    data = lab.wait_state(rid, {"completed"}, 120)
    assert all(runs(lab, d) == "v2" for d in ids)
    assert all(len(lab.fleet.devices[d].manifests) == 1 for d in ids)  # nobody updated twice
    assert data["current_wave"] == 2
