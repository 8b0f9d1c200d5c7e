"""Trial window and automatic rollback, IO contract and fallback: a real fleet-agent process,
a real Mosquitto, the scripted server peer and the agent's local inference API."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deltafleet.agent.client import AgentClient
from deltafleet.agent.daemon import PAIR_BUDGET_S
from deltafleet.shared import sha256_file
from tests.harness.fleetlab import wait_for
from tests.harness.mqtt_peer import (
    make_linear_model,
    make_nan_on_negative_model,
    make_slow_model,
    start_with_v1,
)

pytestmark = pytest.mark.broker

POLICY = {"max_error_rate_ppm": 1000, "max_p95_ratio_pct": 150, "min_requests": 20}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, onnx_pair) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("trial-models")
    return {**onnx_pair(0.5), "slow": make_slow_model(d / "slow.onnx"),
            "nan": make_nan_on_negative_model(d / "nan.onnx"),
            "fallback": make_linear_model(d / "fallback.onnx"),
            "narrow": make_linear_model(d / "narrow.onnx", input_dim=32)}


def test_slower_model_is_rolled_back_within_its_window(lab, key, peer, models):
    client = start_with_v1(lab, peer, key[1], models["v1"], "trial-slow")
    assert client.predict("detector", np.zeros((1, 64), np.float32)).version == "v1"
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    golden = ({"input": {"dtype": "float32", "shape": [1, 64],
                         "b64": base64.b64encode(x.tobytes()).decode()}},)
    m = peer.offer("trial-slow", "detector", "v2-slow", models["slow"], serial=2,
                   trial_window_s=3, health_policy=POLICY, golden_inputs=golden)
    trial = peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "trial", 30)
    t0 = time.monotonic()
    ev = peer.wait_event(lambda e: e.manifest_id == m.manifest_id
                         and e.state in ("healthy", "rolled_back"), 30)
    assert ev.state == "rolled_back", ev
    # decided at the end of its window plus the paired old/new probes, not later
    assert time.monotonic() - t0 < 3 + PAIR_BUDGET_S + 2.0
    assert ev.reason.startswith("latency ") and "interleaved pairs" in ev.reason
    assert ev.health["latency_ratio_low_pct"] > 150 and ev.health["pairs"] >= 7
    assert ev.health["p95_us"] > ev.health["baseline_p95_us"] > 0
    assert ev.health["requests"] >= POLICY["min_requests"]
    assert ev.sha256 == sha256_file(models["v1"])
    assert trial.sha256 == sha256_file(models["slow"])
    assert lab.agent_status("trial-slow")[0]["version"] == "v1"
    assert client.predict("detector", np.zeros((1, 64), np.float32)).version == "v1"
    client.close()


def test_erroring_model_is_rolled_back_and_the_fallback_answers_meanwhile(lab, key, peer, models):
    client = start_with_v1(lab, peer, key[1], models["v1"], "trial-err",
                           FLEET_AGENT_FALLBACK=f"detector={models['fallback']}")
    m = peer.offer("trial-err", "detector", "v2-bad", models["nan"], serial=2,
                   trial_window_s=20, health_policy=POLICY)
    peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "trial", 30)
    t0 = time.monotonic()
    answered: list[tuple[str | None, str | None]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def traffic() -> None:
        with AgentClient(port=client.port) as c:
            while not stop.is_set():
                try:
                    r = c.predict("detector", np.full((2, 64), -1.0, np.float32))
                    answered.append((r.version, r.fallback))
                except BaseException as e:  # noqa: BLE001
                    failures.append(e)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        ev = peer.wait_event(lambda e: e.manifest_id == m.manifest_id
                             and e.state in ("healthy", "rolled_back"), 30)
        after = len(answered)  # then requests begun after the verdict, answered by v1 again
        wait_for(lambda: failures or (len(answered) >= after + 2 and answered[-1] == ("v1", None)),
                 30, "the kept version to answer again after the rollback")
    finally:
        stop.set()
        worker.join(10)
    assert ev.state == "rolled_back"
    assert time.monotonic() - t0 < 10  # a clear error-rate breach does not wait for the window
    assert "error rate" in ev.reason and ev.health["errors"] > 0
    assert not failures  # the fallback answered every request the new model failed
    assert (None, "fallback.onnx") in answered
    assert answered[-1] == ("v1", None)
    assert lab.agent_status("trial-err")[0]["version"] == "v1"
    recent = client.results("detector", limit=5)
    assert len(recent) == 5 and all(r["input_sha256"] for r in recent)
    client.close()


def test_changed_io_contract_is_refused_unless_the_manifest_allows_it(lab, key, peer, models):
    client = start_with_v1(lab, peer, key[1], models["v1"], "trial-io")
    m = peer.offer("trial-io", "detector", "v2-narrow", models["narrow"], serial=2)
    ev = peer.wait_event(lambda e: e.manifest_id == m.manifest_id
                         and e.state in ("failed", "healthy"), 30)
    assert ev.state == "failed" and "IO contract changed" in ev.reason
    assert client.predict("detector", np.zeros((1, 64), np.float32)).version == "v1"
    m = peer.offer("trial-io", "detector", "v2-narrow", models["narrow"], serial=3,
                   allow_io_change=True)
    ev = peer.wait_event(lambda e: e.manifest_id == m.manifest_id
                         and e.state in ("failed", "healthy"), 30)
    assert ev.state == "healthy", ev.reason
    assert client.predict("detector", np.zeros((1, 32), np.float32)).version == "v2-narrow"
    client.close()


def test_model_not_matching_its_signed_io_signature_is_refused(lab, key, peer, models):
    client = start_with_v1(lab, peer, key[1], models["v1"], "trial-sig")
    sig = {"inputs": [{"name": "input", "dtype": "float32", "shape": [None, 64]}],
           "outputs": [{"name": "output", "dtype": "float32", "shape": [None, 12]}]}
    m = peer.offer("trial-sig", "detector", "v2", models["v2"], serial=2, io_signature=sig)
    ev = peer.wait_event(lambda e: e.manifest_id == m.manifest_id
                         and e.state in ("failed", "healthy"), 30)
    assert ev.state == "failed" and "signed IO signature" in ev.reason
    assert client.predict("detector", np.zeros((1, 64), np.float32)).version == "v1"
    client.close()
