"""Operator truth (issue 14) with real processes: `fleetctl server`, fleet-agent processes and
fleetctl calls on the session's Mosquitto, under a topic prefix of their own.

- a device in a trial is not "healthy" for a newer rollout that takes it over (--supersede):
  its target waits, saying so, and `device list`/`device show` mark what runs "(trial)";
  once the trial commits the newer rollout marks it healthy;
- `rollout abort` stops a download in flight: the agent drops it (no chunks, no journal
  record left) and keeps its model, and `device show` says the download was stopped;
- a download that times out before applying counts the bytes it fetched;
- `device show` of an offline device says its pending target waits for it.

One lab for the module (one device, group and model per test), v1 installed everywhere
first."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from deltafleet.shared import sha256_file
from tests.harness.fleetlab import Lab, wait_for
from tests.harness.modelgen import make_onnx_model, make_onnx_pair

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = {"dev-trial": "trial", "dev-abort": "abort", "dev-bytes": "bytes", "dev-off": "off"}
FAST = ("--health-window", "1s", "--retry-backoff", "1s")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker) -> Any:
    root = tmp_path_factory.mktemp("truth2")
    lab = Lab(root / "lab", mqtt_url=broker.url)
    lab.env["FLEET_TOPIC_PREFIX"] = f"t{uuid.uuid4().hex[:8]}/v1"
    lab.env["COLUMNS"] = "200"  # fleetctl tables unwrapped
    try:
        v1, v2 = make_onnx_pair(root / "models", size_mb=0.3)
        # unrelated weights (no delta is worth it), one model per test: their chunks are
        # retained at the broker, so no test may find another's already there. Served at
        # 64 KiB/s (one chunk a second): v3 takes 30 s, v4 15 s.
        big = {name: make_onnx_model(root / "models" / f"{name}.onnx", seed=seed, size_mb=mb)
               for name, seed, mb in (("v3", 11, 2.0), ("v4", 12, 1.0))}
        lab.fleetctl("init")
        for version, path in {"v1": v1, "v2": v2, **big}.items():
            lab.fleetctl("model", "add", "detector", version, str(path))
        lab.fleetctl("group", "create", "all", "--match", "site=lab")
        for role in DEVICES.values():
            lab.fleetctl("group", "create", role, "--match", f"role={role}")
        lab.start_server()
        for device_id, role in DEVICES.items():
            env = {"FLEET_AGENT_DOWNLOAD_TIMEOUT_S": "4"} if role == "bytes" else None
            lab.start_agent(device_id, {"site": "lab", "role": role}, extra_env=env)
        wait_for(lambda: lab.online_devices() >= set(DEVICES), 30, "agents online")
        r1 = lab.fleetctl_json("rollout", "model", "v1", "--group", "all", "--wait",
                               "--timeout", "90", *FAST)
        assert r1["state"] == "completed", r1
        yield {"lab": lab, "v1": v1, "v2": v2, **big}
    finally:
        lab.close()


def status(lab: Lab, rid: int) -> dict[str, Any]:
    return lab.fleetctl_json("rollout", "status", str(rid))


def target(lab: Lab, rid: int, device_id: str) -> dict[str, Any]:
    (t,) = [t for t in status(lab, rid)["targets"] if t["device"] == device_id]
    return t


def shown(lab: Lab, device_id: str) -> dict[str, Any]:
    return lab.fleetctl_json("device", "show", device_id)


def start(lab: Lab, *args: str) -> int:
    return int(lab.fleetctl_json("rollout", "model", *args)["id"])


def test_a_device_in_trial_is_not_healthy_for_the_rollout_that_takes_it_over(fleet):
    lab, dev = fleet["lab"], "dev-trial"
    old = start(lab, "v2", "--group", "trial", "--health-window", "25s")  # checked within it
    wait_for(lambda: target(lab, old, dev)["state"] == "trial", 30, "the old rollout's trial")
    (running,) = shown(lab, dev)["running"]
    assert (running["version"], running["state"]) == ("v2", "trial"), running
    assert "detector:v2 (trial)" in lab.fleetctl("device", "list").stdout

    new = start(lab, "v2", "--group", "trial", "--supersede", *FAST)
    waiting = "the device is trying v2 in a trial; healthy once it commits"
    t = wait_for(lambda: (x := target(lab, new, dev))["reason"] == waiting and x, 10,
                 "the new target waiting for the trial")
    assert t["state"] == "pending", t
    text = lab.fleetctl("device", "show", dev).stdout
    assert "v2 (trial)" in text.split("runs (as the device reported)")[1], text
    desired = shown(lab, dev)["desired"]
    assert [(d["rollout_id"], d["state"]) for d in desired] == [(new, "pending")], desired
    assert waiting in desired[0]["why"]

    data = wait_for(lambda: (d := status(lab, new))["state"] == "completed" and d, 40,
                    "the new rollout completed after the commit")
    (t,) = data["targets"]
    assert t["state"] == "healthy" and t["running_sha256"] == sha256_file(fleet["v2"]), t
    after = shown(lab, dev)
    assert after["running"][0]["state"] is None and after["desired"] == [], after
    assert "(trial)" not in lab.fleetctl("device", "show", dev).stdout


def test_an_abort_stops_a_download_in_flight_and_the_device_keeps_its_model(fleet):
    lab, dev = fleet["lab"], "dev-abort"
    downloads = lab.agent_dir(dev) / "downloads"
    rid = start(lab, "v3", "--group", "abort", "--bandwidth", "64KiB/s", *FAST)
    wait_for(lambda: target(lab, rid, dev)["state"] == "downloading", 30, "downloading")
    wait_for(lambda: any(p.is_file() for p in downloads.rglob("*")), 20, "a chunk on disk")
    assert (lab.agent_dir(dev) / "journal").exists()

    lab.fleetctl("rollout", "abort", str(rid))
    wait_for(lambda: status(lab, rid)["state"] == "aborted", 20, "aborted")
    t = target(lab, rid, dev)
    assert t["state"] == "cancelled", t
    assert "downloading the full" in t["reason"] and "download stopped" in t["reason"], t
    assert "may end on" not in t["reason"], t

    def dropped() -> bool:
        journal = lab.agent_dir(dev) / "journal"
        records = [p for p in journal.rglob("*") if p.is_file()] if journal.exists() else []
        return not any(p.is_file() for p in downloads.rglob("*")) and not records

    wait_for(dropped, 15, "the agent dropped the chunks and the journal record")
    assert "download stopped" in lab.log(f"agent-{dev}")
    (st,) = lab.agent_status(dev)
    assert (st["version"], st["sha256"]) == ("v1", sha256_file(fleet["v1"])), st
    d = shown(lab, dev)
    assert [(m["version"], m["state"]) for m in d["running"]] == [("v1", None)], d
    (asked,) = d["desired"]
    assert (asked["version"], asked["state"], asked["open"]) == ("v3", "cancelled", False)
    assert "download stopped" in asked["why"] and "(rollout aborted)" in asked["why"], asked
    text = lab.fleetctl("device", "show", dev, "--wide").stdout
    assert "download stopped" in text and "v3" in text.split("asked to run")[1], text
    # the agent kept going: nothing arrives for the withdrawn download any more
    assert not any(p.is_file() for p in downloads.rglob("*"))


def test_a_download_that_times_out_counts_the_bytes_it_fetched(fleet):
    lab, dev = fleet["lab"], "dev-bytes"
    rid = start(lab, "v4", "--group", "bytes", "--bandwidth", "64KiB/s", "--max-attempts", "1",
                *FAST)
    t = wait_for(lambda: (x := target(lab, rid, dev))["state"] == "failed" and x, 40,
                 "the download timed out")
    assert "download timed out" in t["reason"], t
    assert 0 < t["bytes_sent"] < t["artifact_bytes"], t
    data = status(lab, rid)
    assert data["bytes_sent"] == t["bytes_sent"], data
    text = lab.fleetctl("rollout", "status", str(rid)).stdout
    assert "0 B" not in [line for line in text.splitlines() if line.startswith(dev)][0], text
    (st,) = lab.agent_status(dev)
    assert st["version"] == "v1"


def test_device_show_of_an_offline_device_says_its_pending_target_waits_for_it(fleet):
    lab, dev = fleet["lab"], "dev-off"
    lab.stop(f"agent-{dev}")
    wait_for(lambda: dev not in lab.online_devices(), 15, "the device offline")
    rid = start(lab, "v2", "--group", "off", *FAST)
    wait_for(lambda: target(lab, rid, dev)["state"] == "pending", 10, "pending")
    (asked,) = shown(lab, dev)["desired"]
    assert asked["state"] == "pending" and asked["open"] is True, asked
    assert asked["waiting"].startswith("device offline since "), asked
    assert asked["why"].startswith("pending: waiting: device offline since "), asked
    assert "the update is sent when it reconnects" in asked["why"], asked
    text = lab.fleetctl("device", "show", dev, "--wide").stdout
    assert "waiting: device offline since" in " ".join(text.split()), text
    lab.fleetctl("rollout", "abort", str(rid))
    wait_for(lambda: status(lab, rid)["state"] == "aborted", 20, "aborted")
    (asked,) = shown(lab, dev)["desired"]
    assert (asked["state"], asked["waiting"]) == ("cancelled", None), asked  # nothing waits
