"""fleetctl rollout plan / status / pause / resume / abort / rollback against a live
(in-process) server and simulated devices on a real broker."""

from __future__ import annotations

import json

import pytest

from deltafleet.shared import SigningKey
from tests.harness import cli
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker


@pytest.fixture
def lab(rollout_lab, onnx_pair, monkeypatch: pytest.MonkeyPatch) -> RolloutLab:
    lab = rollout_lab(onnx_pair(0.3), start=False)
    monkeypatch.setenv("FLEET_HOME", str(lab.cfg.home))
    monkeypatch.setenv("FLEET_DB_URL", lab.cfg.db_url)
    monkeypatch.setenv("FLEET_ACTOR", "alice")
    lab.start_server()
    return lab


def fleetctl(*args: str) -> tuple[int, str]:
    res = cli.fleetctl(*args, catch_exceptions=True)
    return res.exit_code, res.output


def test_plan_shows_variant_artifact_and_who_cannot_take_the_model(lab):
    ids = lab.add_devices(4, {"hw": "jetson"})
    lab.add_devices(1, {"hw": "jetson"}, prefix="fresh", version=None)
    tfl = lab.fleet.devices[ids[0]]
    tfl.runtimes = {"litert": "2.3"}
    tfl.send_hello()
    lab.wait_for(lambda: lab.status_runtimes(ids[0]) == {"litert": "2.3"}, 10, "new profile")
    lab.group("jetson", hw="jetson")
    code, out = fleetctl("rollout", "plan", "v2", "--group", "jetson", "--json")
    assert code == 0, out
    plan = {d["device"]: d for d in json.loads(out)["devices"]}
    assert plan[ids[0]]["can_take"] is False and "litert" in plan[ids[0]]["reason"]
    assert plan["fresh-000"]["artifact"] == "full"
    assert plan[ids[1]]["variant"] == "default" and plan[ids[1]]["artifact"] == "delta?"
    assert lab.fleet.devices[ids[1]].manifests == []  # planning sends nothing


def test_pause_resume_abort_are_idempotent_and_audited(lab):
    lab.add_devices(10, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    rid = lab.rollout("v2", "jetson", canary="2", waves=(100.0,), health_window_s=30,
                      state_timeout_s=60)
    assert fleetctl("rollout", "pause", str(rid))[0] == 0
    code, out = fleetctl("rollout", "pause", str(rid), "--json")
    assert code == 0 and json.loads(out) == {"id": rid, "state": "paused", "changed": False}
    assert fleetctl("rollout", "resume", str(rid))[0] == 0
    assert fleetctl("rollout", "abort", str(rid))[0] == 0
    lab.wait_state(rid, {"aborted"}, 30)
    code, out = fleetctl("rollout", "abort", str(rid), "--json")
    assert code == 0 and json.loads(out)["changed"] is False
    code, out = fleetctl("rollout", "resume", str(rid))
    assert code == 2 and "aborted" in out
    data = lab.status(rid)
    assert all(t["state"] == "cancelled" for t in data["targets"])
    assert all(not d.manifests for d in lab.fleet.devices.values()
               if d.device_id not in {t["device"] for t in data["targets"] if t["wave"] == 0})
    code, out = fleetctl("audit", "--json")
    actions = [(e["actor"], e["action"]) for e in json.loads(out)]
    for action in ("rollout.create", "rollout.pause", "rollout.resume", "rollout.abort"):
        assert any(a == action for _, a in actions), action
    assert ("alice", "rollout.pause") in actions


def test_status_json_reports_waves_states_and_bytes(lab):
    lab.add_devices(6, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    rid = lab.rollout("v2", "jetson", canary="1", waves=(50.0, 100.0), health_window_s=1)
    lab.wait_state(rid, {"completed"}, 60)
    code, out = fleetctl("rollout", "status", str(rid), "--json")
    assert code == 0
    data = json.loads(out)
    assert sorted({t["wave"] for t in data["targets"]}) == [0, 1, 2]
    assert data["bytes_sent"] < data["full_bytes"] / 2
    code, out = fleetctl("rollout", "list", "--json")
    assert code == 0 and json.loads(out)[0]["state"] == "completed"


def test_canary_failure_with_on_failure_abort_withdraws_the_rollout(lab):
    ids = lab.add_devices(10, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    lab.fleet.devices[ids[0]].knobs.fail_apply = True
    code, out = fleetctl("rollout", "model", "v2", "--group", "jetson", "--canary", "1",
                         "--on-failure", "abort", "--health-window", "1s", "--wait",
                         "--timeout", "60s")
    assert code == 1
    rid = max(int(r["id"]) for r in json.loads(fleetctl("rollout", "list", "--json")[1]))
    assert lab.status(rid)["state"] == "aborted"
    assert all(not lab.fleet.devices[d].manifests for d in ids[1:])


def test_invalid_rollout_options_are_one_line_errors(lab):
    lab.add_devices(1, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    for args in (["--waves", "50%,20%"], ["--canary", "0"], ["--on-failure", "explode"],
                 ["--health-window", "soon"], ["--max-failure", "150%"]):
        code, out = fleetctl("rollout", "model", "v2", "--group", "jetson", *args)
        assert code == 2 and out.strip().count("\n") == 0 and out.startswith("error:"), (args, out)


def test_a_rejection_of_a_manifest_the_device_cannot_read_is_applied_and_shown(lab):
    """Signed with a key the device does not trust: its rejection names no version."""
    (dev,) = lab.add_devices(1, {"hw": "jetson"})
    lab.stop_server()
    SigningKey.generate().save(lab.cfg.signing_key_path, lab.cfg.public_key_path)
    lab.start_server()
    lab.group("jetson", hw="jetson")
    rid = lab.rollout("v2", "jetson", state_timeout_s=600)
    lab.wait_state(rid, {"paused"}, 30)
    (target,) = lab.status(rid)["targets"]
    assert target["state"] == "held" and "rejected" in target["reason"], target
    assert "signature" in target["reason"], target
    for args in (("device", "list"), ("device", "show", dev), ("rollout", "status", str(rid))):
        code, out = fleetctl(*args)
        assert code in (0, 1) and "None" not in out, out
    code, out = fleetctl("device", "show", dev, "--json")
    shown = json.loads(out)
    (model,) = shown["models"]
    # the rejection names no version: what runs stays as the device last reported it
    assert model["version"] == "v1" and model["sha256"] == target["running_sha256"]
    (asked,) = shown["desired"]
    assert (asked["version"], asked["rollout_id"], asked["state"]) == ("v2", rid, "held")
