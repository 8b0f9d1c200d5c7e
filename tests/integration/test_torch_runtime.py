"""PyTorch Mobile end to end: a real server (in-process) rolls trained TorchScript-lite (.ptl)
classifiers out to a real fleet-agent process that runs them in torch's lite interpreter and
serves them on its local API; v2 arrives as a delta from v1 and is hot-swapped under traffic;
a v2 that answers NaN on live traffic is rolled back by its trial, one whose outputs do not
match what it declares never goes into service."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deltafleet.agent.client import AgentClient, ApiError
from deltafleet.server import catalog
from deltafleet.shared import sha256_file
from tests.harness.need import missing
from tests.harness.traffic import PredictTraffic

pytestmark = pytest.mark.broker

FAST_TRIAL = {"health_window_s": 2, "state_timeout_s": 60}


@pytest.fixture(scope="module")
def ptl_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if importlib.util.find_spec("torch") is None:
        missing("torch (the agent's torch extra)")
    from tests.harness.modelgen import make_ptl_model, make_ptl_pair

    d = tmp_path_factory.mktemp("ptl-models")
    v1, v2 = make_ptl_pair(d, size_mb=0.5)
    return {"v1": v1, "v2": v2,
            "v3-nan": make_ptl_model(d / "nan.ptl", misbehave="nan_on_negative"),
            "v3-shape": make_ptl_model(d / "shape.ptl", misbehave="wrong_shape")}


@pytest.fixture
def phone(request, rollout_lab, ptl_models: dict[str, Path], tmp_path: Path) -> Iterator[tuple]:
    """A RolloutLab whose catalog holds every .ptl version, and one real agent (group
    "phones") on its topics, serving its API on its own port; its swap mode is the test's
    indirect parameter (default "auto": warm here)."""
    from tests.harness.fleetlab import Lab, free_port

    lab = rollout_lab({"v1": ptl_models["v1"], "v2": ptl_models["v2"]})
    with lab.store.session() as s:
        for version in ("v3-nan", "v3-shape"):
            catalog.add_model_version(s, lab.blobs, "detector", version, ptl_models[version])
    procs = Lab(tmp_path / "procs", mqtt_url=lab.cfg.mqtt_url)
    procs.env.update(FLEET_HOME=str(lab.cfg.home), FLEET_TOPIC_PREFIX=lab.cfg.topic_prefix)
    port = free_port()
    procs.start_agent("phone-1", {"hw": "phone"}, trusted_key=lab.cfg.public_key_path,
                      extra_env={"FLEET_AGENT_API_PORT": str(port),
                                 "FLEET_AGENT_SWAP_MODE": getattr(request, "param", "auto")})
    lab.wait_for(lambda: "phone-1" in lab.known_devices(), 30, "the agent registered")
    lab.group("phones", hw="phone")
    try:
        yield lab, procs, AgentClient(port=port)
    finally:
        procs.close()


def roll_out(lab, version: str, states: set[str] | None = None) -> dict:
    # the last rollout may be paused on the device's failure: the new one takes it over
    rid = lab.rollout(version, "phones", supersede=True, **FAST_TRIAL)
    data = lab.wait_state(rid, states or {"completed", "paused", "aborted", "failed"}, 60)
    return data


def reference_probs(x: np.ndarray, *, retrain_head: bool) -> np.ndarray:
    import torch

    from tests.harness.modelgen import ptl_classifier

    model = ptl_classifier(size_mb=0.5, retrain_head=retrain_head)
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_the_agent_serves_v1_then_hot_swaps_v2_delivered_as_a_delta_under_traffic(phone,
                                                                                 ptl_models):
    from tests.harness.modelgen import ptl_dataset

    lab, procs, client = phone
    assert "torch" in lab.status_runtimes("phone-1")  # advertised in its hello
    data = roll_out(lab, "v1")
    assert data["state"] == "completed", data
    (target,) = data["targets"]
    assert target["artifact"] == "full" and target["state"] == "healthy", target
    x = ptl_dataset()[0][:4]
    r = client.predict("detector", x)
    assert r.version == "v1" and r.sha256 == sha256_file(ptl_models["v1"])
    np.testing.assert_allclose(r.outputs["probs"], reference_probs(x, retrain_head=False),
                               rtol=1e-5, atol=1e-6)

    with PredictTraffic(client.port, threads=2) as traffic:
        data = roll_out(lab, "v2")
    answered, failures = traffic.answered, traffic.failures
    assert data["state"] == "completed", data
    (target,) = data["targets"]
    assert target["artifact"] == "delta" and target["state"] == "healthy", target
    assert target["bytes_sent"] < ptl_models["v2"].stat().st_size / 10, target
    assert not failures, failures[:3]
    assert "v1" in answered and answered[-1] == "v2" and None not in answered
    assert procs.agent_status("phone-1")[0]["sha256"] == sha256_file(ptl_models["v2"])
    x = np.full((2, 64), 0.5, np.float32)
    np.testing.assert_allclose(client.predict("detector", x).outputs["probs"],
                               reference_probs(x, retrain_head=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("phone", ["cold"], indirect=True)  # rollback reloads v1 from disk
def test_a_v2_answering_nan_is_rolled_back_and_one_of_the_wrong_shape_never_serves(phone,
                                                                                   ptl_models):
    lab, procs, client = phone
    assert roll_out(lab, "v1")["state"] == "completed"
    v1_sha = sha256_file(ptl_models["v1"])

    # declares probs [N, 10], returns [N, 5]: its warm-up fails, v1 goes on serving
    data = roll_out(lab, "v3-shape")
    (target,) = data["targets"]
    # the device failed it (the rollout holds it for a retry)
    assert target["reason"].startswith("failed applying: output 'probs' has shape (1, 5)"), target
    assert client.predict("detector", np.zeros((1, 64), np.float32)).version == "v1"

    # answers zeros (its warm-up) but NaN on live negative inputs: the trial rolls it back
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with AgentClient(port=client.port) as c:
            x = np.full((1, 64), -1.0, np.float32)
            while not stop.is_set():
                try:
                    c.predict("detector", x)
                except ApiError as e:
                    errors.append(str(e))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        data = roll_out(lab, "v3-nan")
    finally:
        stop.set()
        worker.join(10)
    (target,) = data["targets"]
    assert target["reason"].startswith("rolled_back in its health trial: error rate"), target
    assert errors and any("NaN" in e for e in errors), errors[:3]
    assert procs.agent_status("phone-1")[0]["sha256"] == v1_sha
    assert client.predict("detector", np.full((1, 64), -1.0, np.float32)).version == "v1"
    assert "cold swap of detector" in procs.log("agent-phone-1")
