"""The local inference API and its client, in-process on a free port."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deltafleet.agent.api import InferenceApi
from deltafleet.agent.client import AgentClient, ApiError
from deltafleet.agent.runtime import load_model
from deltafleet.agent.serving import Serving
from tests.harness import modelgen


@pytest.fixture
def api(tmp_path: Path):
    v1 = modelgen.make_onnx_model(tmp_path / "v1.onnx", size_mb=0.1)
    serving = Serving(results_size=10)
    serving.install("det", load_model(v1, "onnx"), "v1", "a" * 64)
    serving.slot("empty")

    def describe():
        return [{"name": n, "version": s.session.version if s.session else None,
                 "loaded": s.session is not None, "fallback": s.fallback_name, "in_trial": False}
                for n, s in serving.slots.items()]

    server = InferenceApi(serving, describe, port=0)
    server.start()
    yield server
    server.stop()
    serving.close()


def test_json_predict_names_the_version_that_answered(api):
    with AgentClient(port=api.port) as c:
        r = c.predict("det", {"input": np.zeros((2, 64), np.float32)})
        assert r.version == "v1" and r.fallback is None
        assert r.outputs["output"].shape == (2, 10)


def test_npy_body_and_answer(api):
    with AgentClient(port=api.port) as c:
        r = c.predict_npy("det", np.ones((3, 64), np.float32))
        assert r.version == "v1" and r.outputs["output"].shape == (3, 10)


def test_health_models_and_results(api):
    with AgentClient(port=api.port) as c:
        c.predict("det", np.zeros((1, 64), np.float32))
        health = c.health()
        assert health["status"] == "degraded"  # "empty" has no model
        assert health["models"]["det"]["serving"] == "primary"
        assert {m["name"] for m in c.models()} == {"det", "empty"}
        (last,) = c.results("det", limit=1)
        assert last["version"] == "v1" and len(last["input_sha256"]) == 64


def test_errors_are_one_line_with_the_right_status(api):
    with AgentClient(port=api.port) as c:
        with pytest.raises(ApiError) as e:
            c.predict("nope", np.zeros((1, 64), np.float32))
        assert e.value.status == 404
        with pytest.raises(ApiError) as e:
            c.predict("det", {"wrong": np.zeros((1, 64), np.float32)})
        assert e.value.status == 400
        with pytest.raises(ApiError) as e:
            c.predict("empty", {"input": np.zeros((1, 64), np.float32)})
        assert e.value.status == 503
