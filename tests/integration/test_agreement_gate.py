"""The agreement gate with a real fleet-agent process, real onnxruntime and a real Mosquitto
(the scripted server peer signs the manifests): during the trial a sample of live requests is
rerun on the previous model off the request path, and a model whose answers disagree with the
previous version's more than the manifest's ``min_agreement_ppm`` allows is rolled back, while
a faithful INT8 variant passes.

The models are a classifier trained on scikit-learn's packaged digits (v1), the same model
with three classes' output weights rotated (answers differently on ~30% of digits) and v1's
INT8 variant (ONNX Runtime dynamic quantization); live traffic is the digits test split."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import pytest

from deltafleet.agent.client import AgentClient
from tests.harness.mqtt_peer import Peer, start_with_v1
from tests.harness.traffic import PredictTraffic

pytestmark = pytest.mark.broker

GATE = {"max_error_rate_ppm": 1000, "max_p95_ratio_pct": 0, "min_requests": 20,
        "min_agreement_ppm": 980_000}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.harness.modelgen import (
        make_digits_onnx,
        make_int8_variant,
        make_permuted_classes,
        train_digits,
    )

    d = tmp_path_factory.mktemp("agreement")
    model = train_digits()
    v1 = make_digits_onnx(d / "v1.onnx", model)
    return {"v1": v1, "rotated": make_permuted_classes(v1, d / "rotated.onnx"),
            "int8": make_int8_variant(v1, d / "int8.onnx"), "x": model.x_test}


def golden(x: np.ndarray, n: int) -> tuple[dict, ...]:
    return tuple({"input": {"dtype": "float32", "shape": [1, 64],
                            "b64": base64.b64encode(np.ascontiguousarray(
                                x[i:i + 1], np.float32).tobytes()).decode()}}
                 for i in range(n))


def Traffic(port: int, x: np.ndarray) -> PredictTraffic:  # noqa: N802 - reads as the class
    """Live requests (digits, one per call) from a thread; every answer and failure kept."""
    return PredictTraffic(port, threads=1, rows=x)


def _verdict(peer: Peer, manifest_id: str):
    return peer.wait_event(lambda e: e.manifest_id == manifest_id
                           and e.state in ("healthy", "rolled_back"), 60)


@pytest.fixture
def agent(lab, key, peer, digits) -> Iterator:
    made: list[AgentClient] = []

    def start(device: str, **env: str) -> AgentClient:
        made.append(start_with_v1(lab, peer, key[1], digits["v1"], device, **env))
        return made[-1]

    yield start
    for c in made:
        c.close()


def _gated_under_traffic(agent, peer, digits, device: str, version: str, model: str, *,
                        window_s: int):
    """Offer ``digits[model]`` as ``version`` to a new agent running v1, under live traffic,
    with the agreement gate on; its verdict event and the traffic seen."""
    client = agent(device)
    m = peer.offer(device, "detector", version, digits[model], serial=2,
                   trial_window_s=window_s, health_policy=GATE,
                   golden_inputs=golden(digits["x"], 4))
    with Traffic(client.port, digits["x"]) as traffic:
        ev = _verdict(peer, m.manifest_id)
    return ev, traffic


def test_a_model_that_disagrees_is_rolled_back_by_the_gate_under_live_traffic(
        lab, peer, digits, agent):
    ev, traffic = _gated_under_traffic(agent, peer, digits, "gate-rotated", "v2-rotated",
                                       "rotated", window_s=30)
    assert ev.state == "rolled_back", ev
    assert ev.reason.startswith("output agreement "), ev.reason
    assert "< 98% required" in ev.reason and "shadowed live requests" in ev.reason
    # about 30% of digits answered differently: judged early, well before the 30 s window
    assert 400_000 <= ev.health["agreement_ppm"] < 900_000, ev.health  # 20+ samples of ~70%
    assert ev.health["agreement_samples"] >= 20
    assert ev.health["errors"] == 0  # not an error-rate verdict: every answer was well formed
    assert not traffic.failures
    assert "v2-rotated" in traffic.answered and traffic.answered[-1] == "v1"
    assert lab.agent_status("gate-rotated")[0]["version"] == "v1"


def test_a_faithful_int8_variant_passes_the_gate(lab, peer, digits, agent):
    ev, traffic = _gated_under_traffic(agent, peer, digits, "gate-int8", "v1-int8", "int8",
                                       window_s=4)
    assert ev.state == "healthy", ev
    assert ev.health["agreement_ppm"] >= 980_000, ev.health
    assert ev.health["agreement_samples"] >= 20
    assert not traffic.failures
    assert lab.agent_status("gate-int8")[0]["version"] == "v1-int8"


def test_when_both_cannot_be_held_the_previous_models_recorded_answers_judge(
        lab, peer, digits, agent):
    agent("gate-cold", FLEET_AGENT_SWAP_MODE="cold")
    m = peer.offer("gate-cold", "detector", "v2-rotated", digits["rotated"], serial=2,
                   trial_window_s=2, health_policy=GATE, golden_inputs=golden(digits["x"], 30))
    ev = _verdict(peer, m.manifest_id)
    assert ev.state == "rolled_back", ev
    assert "recorded answers" in ev.reason, ev.reason
    assert ev.health["agreement_samples"] == 30
    assert ev.health["agreement_ppm"] < 980_000


def test_rollout_model_min_agreement_gates_each_device_and_status_shows_it_per_wave(
        lab, digits, tmp_path):
    """End to end: `fleetctl server`, two `fleet-agent`s under live traffic, `fleetctl rollout
    model --min-agreement 98%`: the faithful INT8 version passes on every device (canary, then
    the rest), the rotated one is rolled back by the gate on the canary (the rollout pauses),
    and `rollout status` shows agreement per wave."""
    import json

    from tests.harness.fleetlab import wait_for

    lab.env["FLEET_TOPIC_PREFIX"] = "gate/v1"  # the session broker is shared
    lab.fleetctl("init")
    for version, path in (("v1", digits["v1"]), ("v2", digits["int8"]), ("v3", digits["rotated"])):
        lab.fleetctl("model", "add", "detector", version, str(path))
    lab.fleetctl("group", "create", "lab", "--match", "site=lab")
    lab.start_server()
    devices = ("gate-a", "gate-b")
    for d in devices:
        lab.start_agent(d, {"site": "lab"})
    wait_for(lambda: lab.online_devices() >= set(devices), 30, "agents online")
    fast = ("--health-window", "4s", "--max-p95-ratio", "off", "--retry-backoff", "1s",
            "--min-agreement", "98%", "--canary", "1", "--wait", "--timeout", "120s")
    first = lab.fleetctl("rollout", "model", "v1", "--group", "lab", *fast, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    from tests.harness.fleetlab import wait_port

    for d in devices:
        wait_port(lab.api_ports[d])
    traffic = [Traffic(lab.api_ports[d], digits["x"]) for d in devices]
    for t in traffic:
        t.__enter__()
    try:
        good = lab.fleetctl("rollout", "model", "v2", "--group", "lab", *fast, check=False)
        assert good.returncode == 0, good.stdout + good.stderr
        bad = lab.fleetctl("rollout", "model", "v3", "--group", "lab", *fast,
                           "--max-attempts", "1", "--on-failure", "pause", check=False)
    finally:
        for t in traffic:
            t.__exit__()
    assert bad.returncode == 1, bad.stdout + bad.stderr
    rollouts = {r["version"]: r for r in lab.fleetctl_json("rollout", "list")}
    passed = json.loads(lab.fleetctl("rollout", "status", str(rollouts["v2"]["id"]),
                                     "--json").stdout)
    assert passed["state"] == "completed"
    assert passed["policy"]["health"]["min_agreement_ppm"] == 980_000
    assert [a["wave"] for a in passed["agreement"]] == [0, 1]  # the canary, then the rest
    assert all(a["min_ppm"] >= 980_000 for a in passed["agreement"]), passed["agreement"]
    gated = json.loads(lab.fleetctl("rollout", "status", str(rollouts["v3"]["id"]),
                                    "--json").stdout)
    canary = next(t for t in gated["targets"] if t["wave"] == 0)
    assert canary["state"] == "rolled_back" and "output agreement" in canary["reason"], canary
    assert gated["agreement"][0]["max_ppm"] < 980_000
    human = lab.fleetctl("rollout", "status", str(rollouts["v3"]["id"])).stdout
    assert "agreement with the previous version: wave 1" in " ".join(human.split())
    assert all(not t.failures for t in traffic)
    for d in devices:  # the canary rolled back, the rest never left v2 (paused)
        assert lab.agent_status(d)[0]["version"] == "v2"
