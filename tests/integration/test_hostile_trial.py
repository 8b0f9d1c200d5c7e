"""Hostile devices, bad days (issue 11, item 6): the trial gate on a busy CPU.

A CPU hog (one busy-loop process per core) runs while the agent judges a new model. A model as
fast as the previous one must never be rolled back, a model twice as slow every time. The 20
trials each go through the path the agent's trial takes at the end of its window (the real
ONNX Runtime, ``latency.sample_pairs`` with the daemon's pair count and budget, then the pure
``trial.evaluate``); one identical and one slower model also go through a real fleet-agent
process, a real Mosquitto and the scripted server peer under the same hog. The operator's off
switch (``--max-p95-ratio off`` / ``0``) is checked through fleetctl and on the real agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deltafleet.agent.daemon import PAIR_BUDGET_S
from deltafleet.agent.latency import sample_pairs
from deltafleet.agent.runtime import LoadedModel, load_model, zero_feeds
from deltafleet.agent.serving import SessionStats
from deltafleet.agent.trial import MIN_PAIRS, HealthPolicy, evaluate, p95
from deltafleet.server.errors import UsageError
from deltafleet.server.policy import parse_latency_ratio
from deltafleet.shared import sha256_file
from tests.harness.cli import fleetctl
from tests.harness.mqtt_peer import _save_onnx

TRIALS = 20
DEPTH = 40  # [256 x 256] MatMuls of the base model: ~0.3 ms an inference, unloaded
SLOW_DEPTH = 2 * DEPTH + 6  # twice the work, plus a little for the fixed cost of a call
# The slack is scaled to these sub-millisecond models (the CLI default is 1 ms).
POLICY = {"max_error_rate_ppm": 1000, "max_p95_ratio_pct": 150, "min_requests": 20,
          "p95_slack_us": 50}


def make_chain_model(path: Path, *, depth: int, seed: int, width: int = 256) -> Path:
    """input [N, 64] -> output [N, 10] through ``depth`` [width x width] MatMuls (one shared
    identity weight, so the file stays small); ``seed`` changes the bytes, not the work."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((64, width)) / 8).astype(np.float32),
                                     "w_in"),
             numpy_helper.from_array(np.eye(width, dtype=np.float32), "w_mid"),
             numpy_helper.from_array((rng.standard_normal((width, 10)) / 16).astype(np.float32),
                                     "w_out")]
    nodes = [helper.make_node("MatMul", ["input", "w_in"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", "w_mid"], [f"h{i + 1}"]) for i in range(depth)]
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "w_out"], ["output"]))
    return _save_onnx(
        path, nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], inits)


@contextmanager
def cpu_hog() -> Iterator[list[subprocess.Popen]]:
    """One busy-loop process per core for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(os.cpu_count() or 2)]
    try:
        yield procs
        assert all(p.poll() is None for p in procs), "the CPU hog died during the test"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile-trial")
    return {"v1": make_chain_model(d / "v1.onnx", depth=DEPTH, seed=1),
            "same": make_chain_model(d / "same.onnx", depth=DEPTH, seed=2),
            "slow": make_chain_model(d / "slow.onnx", depth=SLOW_DEPTH, seed=3)}


def trial_on_the_probe_path(old: LoadedModel, new: LoadedModel):
    """What the agent does at the end of a trial window, minus MQTT and the journal."""
    policy = HealthPolicy.from_manifest(POLICY)
    stats = SessionStats()
    pairs = sample_pairs(old, new, [zero_feeds(new)], max(policy.min_requests, MIN_PAIRS),
                         budget_s=PAIR_BUDGET_S, on_new=stats.record)
    requests, errors, _ = stats.snapshot()
    return evaluate(requests, errors, policy, final=True, pairs=pairs)


def single_call_p95(model: LoadedModel, n: int = 200) -> int:
    """p95 of single calls, the kind of figure the trial compared before (for the record)."""
    feeds = zero_feeds(model)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        model.run(feeds)
        samples.append(int((time.perf_counter() - t0) * 1e6))
    return p95(samples)


def test_twenty_trials_under_a_cpu_hog_keep_an_identical_model_and_reject_a_2x_slower_one(models):
    loaded = {name: load_model(path, "onnx") for name, path in models.items()}
    try:
        unloaded = {name: trial_on_the_probe_path(loaded["v1"], loaded[name])
                    for name in ("same", "slow")}
        # the models are what they claim to be, measured before the hog starts
        assert 85 <= unloaded["same"].figures["latency_ratio_pct"] <= 115, unloaded["same"]
        assert 170 <= unloaded["slow"].figures["latency_ratio_pct"] <= 260, unloaded["slow"]
        verdicts: dict[str, list] = {"same": [], "slow": []}
        single = {"unloaded": single_call_p95(loaded["v1"])}
        with cpu_hog():
            single["hog"] = single_call_p95(loaded["v1"])
            for _ in range(TRIALS):
                for name in ("same", "slow"):
                    verdicts[name].append(trial_on_the_probe_path(loaded["v1"], loaded[name]))
    finally:
        for m in loaded.values():
            m.close()
    kept = [v for v in verdicts["same"] if not v.ok]
    assert not kept, f"{len(kept)} of {TRIALS} identical models rolled back: {kept[0]}"
    missed = [v for v in verdicts["slow"] if v.ok]
    assert not missed, f"{len(missed)} of {TRIALS} 2x slower models kept: {missed[0]}"
    for v in verdicts["same"] + verdicts["slow"]:
        assert v.figures["pairs"] >= 7 and v.figures["errors"] == 0, v
    assert all(v.reason.startswith("latency ") for v in verdicts["slow"])
    summary = {name: [(v.figures["latency_ratio_low_pct"], v.figures["latency_ratio_pct"],
                       v.figures["baseline_p95_us"], v.figures["p95_us"]) for v in vs]
               for name, vs in verdicts.items()}
    print("hostile-trial figures (ratio low %, ratio %, old p95 us, new p95 us):",
          json.dumps(summary), "single-call p95 us of v1:", single)


# -- a real agent ---------------------------------------------------------------------------

def test_real_agent_under_a_cpu_hog_keeps_identical_rejects_2x_slower_and_honours_off(
        lab, key, peer, models):
    device = "hostile-trial"
    lab.start_agent(device, {"hw": "test"}, trusted_key=key[1],
                    extra_env={"FLEET_AGENT_API_PORT": "0"})
    peer.offer(device, "detector", "v1", models["v1"], serial=1)
    peer.wait_event(lambda e: e.device_id == device and e.state == "healthy", 60)

    def verdict(version: str, path: Path, serial: int, policy: dict[str, int]):
        m = peer.offer(device, "detector", version, path, serial=serial, trial_window_s=1,
                       health_policy=policy)
        return peer.wait_event(lambda e: e.manifest_id == m.manifest_id
                               and e.state in ("healthy", "rolled_back", "failed"), 60)

    with cpu_hog():
        same = verdict("v2-same", models["same"], 2, POLICY)
        slow = verdict("v3-slow", models["slow"], 3, POLICY)
        running_after_rollback = lab.agent_status(device)[0]["sha256"]
        off = verdict("v3-slow-off", models["slow"], 4, {**POLICY, "max_p95_ratio_pct": 0})
    assert same.state == "healthy", same
    assert same.health["pairs"] >= 7 and same.health["latency_ratio_low_pct"] <= 150, same
    assert slow.state == "rolled_back", slow
    assert slow.reason.startswith("latency ") and slow.health["latency_ratio_low_pct"] > 150
    assert slow.sha256 == sha256_file(models["same"]) == running_after_rollback
    assert off.state == "healthy" and "latency not judged: off" in off.reason, off
    assert "pairs" not in off.health
    assert lab.agent_status(device)[0]["sha256"] == sha256_file(models["slow"])


# -- the operator's switch ------------------------------------------------------------------

def test_max_p95_ratio_accepts_off_and_zero_and_refuses_a_ratio_below_100pct():
    assert parse_latency_ratio("150%") == 150 and parse_latency_ratio("1000") == 1000
    for off in ("off", "OFF", "0", "0%", " 0 "):
        assert parse_latency_ratio(off) == 0, off
    for bad in ("50%", "fast", "-5%", ""):
        with pytest.raises(UsageError) as e:
            parse_latency_ratio(bad)
        assert "\n" not in str(e.value) and "--max-p95-ratio" in str(e.value)


def test_fleetctl_rollout_sends_latency_off_to_devices(fleet_home: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, models):
    monkeypatch.setenv("FLEET_ACTOR", "tester")
    assert fleetctl("init").exit_code == 0
    assert fleetctl("model", "add", "detector", "v1", str(models["v1"])).exit_code == 0
    assert fleetctl("group", "create", "all", "--all").exit_code == 0
    for value in ("off", "0"):
        res = fleetctl("rollout", "model", "detector:v1", "--group", "all", "--allow-empty",
                       "--max-p95-ratio", value, "--json")
        assert res.exit_code == 0, res.output
        rid = json.loads(res.stdout)["id"]
        shown = json.loads(fleetctl("rollout", "status", str(rid), "--json").stdout)
        assert shown["policy"]["health"]["max_p95_ratio_pct"] == 0, shown["policy"]
        assert fleetctl("rollout", "abort", str(rid)).exit_code == 0
    res = fleetctl("rollout", "model", "detector:v1", "--group", "all", "--allow-empty",
                   "--max-p95-ratio", "50%")
    assert res.exit_code == 2 and res.stderr.strip().count("\n") == 0, res.output
    assert "at least 100%, or off" in res.stderr
