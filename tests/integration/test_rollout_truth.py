"""Rollout states tell the truth, and a rollout never takes devices over silently.

- an offline device waits ("offline since ..."), is sent nothing and counts 0 bytes until it
  reconnects;
- bytes are what devices fetched: a rollback that finds the previous model still on the device
  sends 0 and says so, and the rollout's delta figure survives it;
- why delta or full is explained per device in ``rollout status`` and its ``--json``;
- a new rollout over devices a running rollout of the model covers is refused (exit 2) unless
  ``--supersede``; then only those devices move and the others finish in the old rollout;
- an abort says what each device was doing;
- ``--variant`` pins a variant, and a device that cannot load it is named.

fleetctl runs as a user runs it: the installed console script in a subprocess at 80 columns,
against a live (in-process) server with simulated devices (the agent's own update machine) on
a real broker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from deltafleet.server import catalog
from deltafleet.shared import sha256_file
from tests.harness.modelgen import make_onnx_model, make_tflite_model
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker

FAST = ("--health-window", "1s", "--retry-backoff", "1s", "--state-timeout", "60s")


@pytest.fixture
def lab(rollout_lab, onnx_pair, tmp_path: Path) -> RolloutLab:
    """detector v1, v2 (a fine-tune of v1: small deltas) and v3 (unrelated weights: no delta
    is worth it)."""
    v3 = make_onnx_model(tmp_path / "model-v3.onnx", seed=7, size_mb=0.3)
    return rollout_lab({**onnx_pair(0.3), "v3": v3})


def fleetctl(lab: RolloutLab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.fleetctl(*args, columns=80, actor="alice")


def ok(lab: RolloutLab, *args: str) -> str:
    res = fleetctl(lab, *args)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res.stdout


def status(lab: RolloutLab, rid: int) -> dict:
    return json.loads(ok(lab, "rollout", "status", str(rid), "--json"))


def targets(data: dict) -> dict[str, dict]:
    return {t["device"]: t for t in data["targets"]}


def start(lab: RolloutLab, *args: str) -> int:
    return int(json.loads(ok(lab, "rollout", "model", *args, "--json"))["id"])


def one_line_refusal(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# -- offline devices ---------------------------------------------------------------------------
def test_an_offline_device_waits_is_sent_nothing_and_counts_0_bytes_until_it_reconnects(lab):
    on, off = lab.add_devices(2, {"hw": "jetson"})
    lab.fleet.devices[off].go_offline()
    lab.wait_for(lambda: not lab.device_online(off), 10, "device offline")
    lab.group("jetson", hw="jetson")
    rid = start(lab, "v2", "--group", "jetson", *FAST)
    lab.wait_for(lambda: targets(lab.status(rid))[on]["state"] == "healthy", 60, "online done")

    shown = targets(status(lab, rid))[off]
    assert shown["state"] == "pending" and shown["online"] is False, shown
    assert shown["reason"].startswith("waiting: offline since "), shown
    assert shown["offline_since"] and shown["bytes_sent"] == 0, shown
    assert lab.fleet.devices[off].manifests == []  # nothing went out to it
    assert lab.status(rid)["state"] == "running"
    text = ok(lab, "rollout", "status", str(rid))
    (row,) = [x for x in text.splitlines() if x.startswith(off)]
    assert "pending" in row and "0 B" in row, text
    assert "waiting: offline since" in text and "notified" not in text

    lab.fleet.devices[off].come_online()
    data = lab.wait_state(rid, {"completed"}, 60)
    back = targets(data)[off]
    assert back["state"] == "healthy" and back["bytes_sent"] > 0, back
    assert back["online"] is True and not back["reason"].startswith("waiting"), back


# -- bytes and the delta-or-full explanation ---------------------------------------------------
def test_status_explains_delta_or_full_per_device_in_text_and_json(lab):
    (base,) = lab.add_devices(1, {"hw": "jetson"})
    (fresh,) = lab.add_devices(1, {"hw": "jetson"}, prefix="fresh", version=None)
    lab.group("jetson", hw="jetson")
    rid = start(lab, "v2", "--group", "jetson", *FAST)
    lab.wait_state(rid, {"completed"}, 60)
    data = status(lab, rid)
    got = targets(data)
    assert got[base]["artifact"] == "delta", got[base]
    assert got[base]["delivery"].startswith("delta ") and "% of full" in got[base]["delivery"]
    assert "from v1" in got[base]["delivery"]
    assert got[fresh]["artifact"] == "full"
    assert got[fresh]["delivery"].startswith("no version of the model on the device: full "
                                             "sent (")
    for t in got.values():  # what was sent is what the device fetched: the artifact
        assert t["bytes_sent"] == t["artifact_bytes"] > 0, t
    assert data["bytes_sent"] == sum(t["bytes_sent"] for t in got.values())
    text = ok(lab, "rollout", "status", str(rid))
    assert "% of full" in text and "no version of the model on the device" in text

    # v3 shares nothing with v2: no delta is worth sending, and the status says so
    rid3 = start(lab, "v3", "--group", "jetson", *FAST)
    lab.wait_state(rid3, {"completed"}, 90)
    moved = targets(status(lab, rid3))[base]
    assert moved["artifact"] == "full", moved
    assert moved["delivery"].startswith("delta ") and "not worth it, full" in moved["delivery"] \
        or moved["delivery"].startswith("no delta from v2 ("), moved
    assert moved["bytes_sent"] == moved["artifact_bytes"]


def test_a_rollback_from_the_device_cache_sends_0_and_keeps_the_rollout_delta_figure(lab):
    ids = lab.add_devices(2, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    rid = start(lab, "v2", "--group", "jetson", *FAST)
    before = lab.wait_state(rid, {"completed"}, 60)
    assert all(t["artifact"] == "delta" for t in before["targets"])
    assert 0 < before["bytes_sent"] < before["full_bytes"] / 2

    ok(lab, "rollout", "rollback", str(rid))
    lab.wait_state(rid, {"rolled_back"}, 60)
    after = status(lab, rid)
    assert (after["bytes_sent"], after["full_bytes"]) == (before["bytes_sent"],
                                                          before["full_bytes"])
    assert after["rollback_bytes_sent"] == 0
    was = targets(before)
    for device_id, t in targets(after).items():
        assert t["state"] == "reverted", t
        assert (t["artifact"], t["bytes_sent"], t["delivery"]) == (
            "delta", was[device_id]["bytes_sent"], was[device_id]["delivery"])
        assert t["rollback"]["bytes_sent"] == 0 and t["rollback"]["artifact_bytes"] > 0
        assert "0 B sent, the file was still on the device" in t["rollback"]["note"]
    assert all(lab.fleet.devices[d].models["detector"].version == "v1" for d in ids)
    text = ok(lab, "rollout", "status", str(rid))
    assert "rollback sent 0 B" in text and "still on the device" in text
    assert "bytes sent" in text  # the delta figure is still printed


def test_a_rollback_that_downloads_counts_its_bytes_apart(lab):
    ids = lab.add_devices(1, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    rid = start(lab, "v2", "--group", "jetson", *FAST)
    before = lab.wait_state(rid, {"completed"}, 60)
    lab.fleet.model_cache.clear()
    lab.fleet.install_from_cache = False  # the device no longer has v1: it downloads it
    ok(lab, "rollout", "rollback", str(rid))
    lab.wait_state(rid, {"rolled_back"}, 60)
    after = status(lab, rid)
    (t,) = after["targets"]
    assert t["rollback"]["bytes_sent"] == t["rollback"]["artifact_bytes"] > 0, t
    assert after["rollback_bytes_sent"] == t["rollback"]["bytes_sent"]
    assert after["bytes_sent"] == before["bytes_sent"]
    assert lab.fleet.devices[ids[0]].models["detector"].version == "v1"


# -- no silent takeovers -----------------------------------------------------------------------
def test_a_rollout_over_a_running_one_is_refused_then_takes_over_only_the_overlap(lab):
    keep = lab.add_devices(2, {"hw": "jetson", "site": "k"}, prefix="k")
    moved = lab.add_devices(2, {"hw": "jetson", "site": "x"}, prefix="x")
    lab.group("all", hw="jetson")
    lab.group("x", site="x")
    # the canary (k-000) first: the x devices wait in wave 2 of the old rollout
    old = start(lab, "v2", "--group", "all", "--canary", "1", "--health-window", "3s",
                "--retry-backoff", "1s")

    line = one_line_refusal(fleetctl(lab, "rollout", "model", "v3", "--group", "x"))
    assert f"rollout {old} " in line and "covers 2 of these devices" in line, line
    assert "--supersede" in line
    assert len(lab.status(old)["targets"]) == 4  # nothing written
    assert json.loads(ok(lab, "rollout", "list", "--json"))[0]["id"] == old

    res = fleetctl(lab, "rollout", "model", "v3", "--group", "x", "--supersede", *FAST)
    assert res.returncode == 0, res.stderr
    new = int(res.stdout.split()[1])
    assert f"took over 2 device(s) from rollout {old}" in res.stdout, res.stdout
    assert f"its 2 other device(s) stay in rollout {old}" in res.stdout, res.stdout

    old_data = lab.wait_state(old, {"completed"}, 90)
    new_data = lab.wait_state(new, {"completed"}, 90)
    olds = targets(old_data)
    for d in moved:
        assert olds[d]["state"] == "cancelled", olds[d]
        assert olds[d]["reason"].startswith(f"taken over by rollout {new}"), olds[d]
        assert lab.fleet.devices[d].models["detector"].version == "v3"
    for d in keep:  # outside the new group: left to the old rollout, which finished them
        assert olds[d]["state"] == "healthy", olds[d]
        assert lab.fleet.devices[d].models["detector"].version == "v2"
    assert set(targets(new_data)) == set(moved)
    assert all(t["state"] == "healthy" for t in new_data["targets"])
    assert old_data["state_reason"] == "2 taken over by a newer rollout"
    audit = json.loads(ok(lab, "audit", "--json"))
    assert any(e["action"] == "rollout.supersede" and e["actor"] == "alice" for e in audit)


def test_a_rollout_taking_over_every_device_supersedes_the_old_one(lab):
    lab.add_devices(2, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    old = start(lab, "v2", "--group", "jetson", "--canary", "1", "--health-window", "5s")
    res = fleetctl(lab, "rollout", "model", "v3", "--group", "jetson", "--supersede", *FAST)
    assert res.returncode == 0 and f"rollout {old} is superseded" in res.stdout, res.stdout
    assert lab.status(old)["state"] == "superseded"


def test_a_rollout_that_is_rolling_back_is_never_taken_over(lab):
    a, b = lab.add_devices(2, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    rid = start(lab, "v2", "--group", "jetson", *FAST)
    lab.wait_state(rid, {"completed"}, 60)
    lab.fleet.devices[b].go_offline()  # its rollback waits for it: the rollout stays rolling back
    lab.wait_for(lambda: not lab.device_online(b), 10, "device offline")
    ok(lab, "rollout", "rollback", str(rid))
    lab.wait_for(lambda: targets(lab.status(rid))[a]["state"] == "reverted", 60, "a reverted")
    for extra in ((), ("--supersede",)):
        line = one_line_refusal(fleetctl(lab, "rollout", "model", "v3", "--group", "jetson",
                                         *extra))
        # a (reverted) is let go; b is still covered by the rollback
        assert f"rollout {rid} is rolling_back on 1 of these devices; wait until it ends" in line


def test_a_device_that_joins_two_running_rollouts_groups_is_worked_by_one(lab):
    lab.add_devices(2, {"hw": "jetson", "site": "k"}, prefix="k")
    lab.group("all", hw="jetson")
    lab.group("x", site="x")
    first = start(lab, "v2", "--group", "all", "--health-window", "20s")  # stays running
    second = start(lab, "v3", "--group", "x", "--allow-empty", *FAST)  # no overlap: allowed
    (joiner,) = lab.add_devices(1, {"hw": "jetson", "site": "x"}, prefix="x")

    def open_in() -> list[int]:
        return [rid for rid in (first, second)
                if targets(lab.status(rid)).get(joiner, {}).get("state") not in (None,
                                                                                 "cancelled")]

    lab.wait_for(open_in, 30, "the joiner added")
    lab.wait_for(lambda: lab.fleet.devices[joiner].models["detector"].version != "v1", 60,
                 "the joiner updated")
    (owner,) = open_in()
    assert len(open_in()) == 1
    assert not any(t["device"] == joiner for rid in (first, second) if rid != owner
                   for t in lab.status(rid)["targets"])


# -- abort -------------------------------------------------------------------------------------
def test_an_abort_says_what_each_device_was_doing(lab):
    trial, offline = lab.add_devices(2, {"hw": "jetson"})
    lab.fleet.devices[offline].go_offline()
    lab.wait_for(lambda: not lab.device_online(offline), 10, "device offline")
    lab.group("jetson", hw="jetson")
    rid = start(lab, "v2", "--group", "jetson", "--health-window", "60s")
    lab.wait_for(lambda: targets(lab.status(rid))[trial]["state"] == "trial", 60, "in trial")
    ok(lab, "rollout", "abort", str(rid))
    data = lab.wait_state(rid, {"aborted"}, 30)
    got = targets(status(lab, rid))
    assert data["state"] == "aborted"
    assert got[trial]["reason"] == ("rollout aborted while the device was in its health trial "
                                    "of v2; it was not stopped and may end on v2"), got[trial]
    assert got[offline]["reason"].startswith(
        "rollout aborted while the device was not sent the update yet (pending), offline since "
    ), got[offline]


# -- variant pin -------------------------------------------------------------------------------
@pytest.fixture
def variants(lab: RolloutLab, tmp_path: Path) -> dict[str, str]:
    """v2 also as "slim" (ONNX) and "lite" (TFLite); returns their sha256."""
    slim = make_onnx_model(tmp_path / "slim.onnx", seed=3, size_mb=0.2)
    lite = make_tflite_model(tmp_path / "lite.tflite", seed=3)
    with lab.store.session() as s:
        catalog.add_model_version(s, lab.blobs, "detector", "v2", slim, variant="slim",
                                  precision="fp16")
        catalog.add_model_version(s, lab.blobs, "detector", "v2", lite, variant="lite")
    return {"slim": sha256_file(slim), "lite": sha256_file(lite)}


def test_a_pinned_variant_goes_to_every_device_and_one_that_cannot_load_it_is_named(
        lab, variants):
    onnx_only = lab.add_devices(2, {"hw": "jetson"})
    (both,) = lab.add_devices(1, {"hw": "jetson"}, prefix="both")
    dev = lab.fleet.devices[both]
    dev.runtimes = {"onnxruntime": "sim", "litert": "2.3"}
    dev.send_hello()
    lab.wait_for(lambda: "litert" in lab.status_runtimes(both), 10, "new profile")
    lab.group("jetson", hw="jetson")

    plan = json.loads(ok(lab, "rollout", "plan", "v2", "--group", "jetson", "--variant", "lite",
                         "--json"))
    rows = {d["device"]: d for d in plan["devices"]}
    assert plan["variant"] == "lite" and plan["cannot_take"] == 2
    for d in onnx_only:
        assert rows[d]["can_take"] is False
        assert rows[d]["reason"].startswith("cannot load pinned variant lite (tflite)"), rows[d]
    assert rows[both]["variant"] == "lite" and rows[both]["target_sha256"] == variants["lite"]
    text = ok(lab, "rollout", "plan", "v2", "--group", "jetson", "--variant", "lite")
    assert "variant lite pinned" in text and "cannot load pinned variant" in text

    line = one_line_refusal(fleetctl(lab, "rollout", "model", "v2", "--group", "jetson",
                                     "--variant", "lite"))
    assert "2 of 3 devices in group jetson cannot load variant lite" in line, line
    assert all(d in line for d in onnx_only) and "rollout plan" in line
    line = one_line_refusal(fleetctl(lab, "rollout", "model", "v2", "--group", "jetson",
                                     "--variant", "nope"))
    assert "no variant 'nope'" in line and "slim" in line, line
    assert json.loads(ok(lab, "rollout", "list", "--json")) == []  # nothing was started

    rid = start(lab, "v2", "--group", "jetson", "--variant", "slim", *FAST)
    data = lab.wait_state(rid, {"completed"}, 60)
    assert {t["variant"] for t in data["targets"]} == {"slim"}, data["targets"]
    assert all(t["state"] == "healthy" for t in data["targets"])
    assert all(lab.fleet.devices[d].models["detector"].sha256 == variants["slim"]
               for d in [*onnx_only, both])
    assert status(lab, rid)["policy"]["variant"] == "slim"


# -- with real fleet-agent processes -----------------------------------------------------------
@pytest.fixture
def agents(tmp_path: Path, broker):
    """fleetctl, `fleetctl server` and fleet-agent processes, on the session's broker under a
    prefix of their own."""
    import uuid

    from tests.harness.fleetlab import Lab

    lab = Lab(tmp_path / "agents", mqtt_url=broker.url)
    lab.env["FLEET_TOPIC_PREFIX"] = f"t{uuid.uuid4().hex[:8]}/v1"
    yield lab
    lab.close()


def test_a_real_agent_rolls_back_from_its_own_disk_and_the_status_says_0_bytes(
        agents, onnx_pair):
    from tests.harness.fleetlab import wait_for

    lab, files = agents, onnx_pair(0.3)
    lab.fleetctl("init")
    lab.fleetctl("model", "add", "detector", "v1", str(files["v1"]))
    lab.fleetctl("model", "add", "detector", "v2", str(files["v2"]))
    lab.fleetctl("group", "create", "jetson", "--match", "hw=jetson")
    lab.start_server()
    lab.start_agent("jetson-1", {"hw": "jetson"})
    wait_for(lambda: "jetson-1" in lab.online_devices(), 30, "agent online")
    wait = ("--wait", "--timeout", "90", "--health-window", "1s")
    assert lab.fleetctl_json("rollout", "model", "v1", "--group", "jetson", *wait)[
        "state"] == "completed"
    r2 = lab.fleetctl_json("rollout", "model", "v2", "--group", "jetson", *wait)
    (t,) = r2["targets"]
    assert (r2["state"], t["artifact"]) == ("completed", "delta"), r2
    assert t["bytes_sent"] == t["artifact_bytes"] > 0 and t["delivery"].startswith("delta ")

    lab.fleetctl("rollout", "rollback", str(r2["id"]))
    back = wait_for(lambda: (d := lab.fleetctl_json("rollout", "status", str(r2["id"])))[
        "state"] == "rolled_back" and d, 60, "rolled back")
    (b,) = back["targets"]
    assert b["state"] == "reverted", b
    assert b["rollback"]["bytes_sent"] == 0 and back["rollback_bytes_sent"] == 0, b
    assert (b["artifact"], b["bytes_sent"], back["bytes_sent"]) == (
        "delta", t["bytes_sent"], r2["bytes_sent"])
    assert lab.agent_status("jetson-1")[0]["version"] == "v1"
    text = lab.fleetctl("rollout", "status", str(r2["id"])).stdout
    assert "rollback sent 0 B" in text and "still on the device" in text
