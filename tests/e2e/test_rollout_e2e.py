"""The foundation slice end to end: fleetctl + fleetctl server + three fleet-agent processes on a
real Mosquitto, v1 to the fleet as full artifacts (the model zstd-compressed), v2 to the jetson
group as deltas."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet.shared import sha256_file

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = {"jetson-1": "jetson", "jetson-2": "jetson", "rpi-1": "rpi"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker):
    from tests.harness.fleetlab import Lab, wait_for

    root = tmp_path_factory.mktemp("e2e")
    lab = Lab(root / "lab", mqtt_url=broker.url)
    lab.env["FLEET_TOPIC_PREFIX"] = "e2e/v1"  # the session broker is shared with other tests
    try:
        v1, v2 = lab.seed_detector(root / "models", size_mb=2.0, site="lab", devices=DEVICES)
        wait_for(lambda: lab.online_devices() >= set(DEVICES), 30, "agents online")
        r1 = lab.fleetctl_json("rollout", "model", "v1", "--group", "fleet", "--wait",
                               "--timeout", "90", "--health-window", "1s")
        r2 = lab.fleetctl_json("rollout", "model", "detector:v2", "--group", "jetson", "--wait",
                               "--timeout", "90", "--health-window", "1s", "--canary", "1")
        yield {"lab": lab, "v1": v1, "v2": v2, "r1": r1, "r2": r2}
    finally:
        lab.close()


def test_first_rollout_ships_full_models_to_every_device(fleet):
    r1 = fleet["r1"]
    assert r1["state"] == "completed"
    assert {t["device"]: t["artifact"] for t in r1["targets"]} == dict.fromkeys(DEVICES, "full")


def test_first_installs_ship_the_model_zstd_compressed_and_end_on_its_sha(fleet):
    lab, r1 = fleet["lab"], fleet["r1"]
    shown = lab.fleetctl_json("model", "show", "detector")
    (v1,) = next(v for v in shown["versions"] if v["version"] == "v1")["variants"]
    packed = v1["compressed"]
    assert packed["codec"] == "zstd" and packed["size_bytes"] < v1["size_bytes"]
    for t in r1["targets"]:
        assert t["state"] == "healthy"
        assert t["bytes_sent"] == packed["size_bytes"] < t["full_bytes"] == v1["size_bytes"]
        assert t["running_sha256"] == sha256_file(fleet["v1"])


def test_jetson_devices_run_v2_after_receiving_a_delta(fleet):
    lab, r2 = fleet["lab"], fleet["r2"]
    assert r2["state"] == "completed"
    assert {t["device"] for t in r2["targets"]} == {"jetson-1", "jetson-2"}
    assert {t["device"]: t["wave"] for t in r2["targets"]} == {"jetson-1": 0, "jetson-2": 1}
    for t in r2["targets"]:
        assert t["state"] == "healthy"
        assert t["artifact"] == "delta"
        assert t["bytes_sent"] < 0.5 * t["full_bytes"]
        assert t["running_sha256"] == sha256_file(fleet["v2"])
        assert lab.agent_status(t["device"])[0]["sha256"] == sha256_file(fleet["v2"])


def test_device_outside_the_group_stays_on_v1(fleet):
    lab = fleet["lab"]
    status = lab.agent_status("rpi-1")[0]
    assert status["version"] == "v1" and status["sha256"] == sha256_file(fleet["v1"])


def test_previous_model_stays_on_disk_for_rollback(fleet):
    lab = fleet["lab"]
    models_dir: Path = lab.agent_dir("jetson-1") / "models"
    assert {p.stem for p in models_dir.iterdir()} == {sha256_file(fleet["v1"]),
                                                      sha256_file(fleet["v2"])}
    assert lab.agent_status("jetson-1")[0]["previous"] == "v1"


def test_server_records_what_each_device_runs(fleet):
    lab = fleet["lab"]
    shown = lab.fleetctl_json("device", "show", "jetson-2")
    text = str(shown)
    assert sha256_file(fleet["v2"]) in text


def test_unknown_group_or_version_is_one_clear_error(fleet):
    lab = fleet["lab"]
    res = lab.fleetctl("rollout", "model", "v2", "--group", "nope", check=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "nope" in res.stderr
    res = lab.fleetctl("rollout", "model", "v9", "--group", "jetson", check=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "v9" in res.stderr
