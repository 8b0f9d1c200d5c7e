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


def _post(port: int, path: str, body: bytes, ctype: str = "application/json",
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": ctype, **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type") == "application/json"
        assert b"\n" not in data and b"Traceback" not in data
        return resp.status, json.loads(data)
    finally:
        conn.close()


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


ROW = "[" + ",".join(["0.5"] * 64) + "]"


@pytest.mark.parametrize(("body", "ctype", "says"), [
    (b"not json", "application/json", "not JSON"),
    (b"\xff\xfe\x00garbage", "application/json", "not JSON"),
    (b'{"input": []}', "application/json", "must be"),
    (b'{"inputs": 3}', "application/json", "must be"),
    (b'{"inputs": {}}', "application/json", "missing input"),
    (b'{"inputs": {"wrong": [' + ROW.encode() + b']}}', "application/json", "unknown wrong"),
    (b'{"inputs": {"input": [' + ROW.encode() + b'], "\\ud800": [1]}}', "application/json",
     "unknown \\ud800"),
    (b'{"inputs": {"input": [' + ROW.encode() + b'], "a\\u0000b": [1]}}', "application/json",
     "unknown a\\x00b"),
    (b'{"inputs": {"input": [["a", "b"]]}}', "application/json", "not an array of numbers"),
    (b'{"inputs": {"input": [[1, 2], [3]]}}', "application/json", "not a rectangular"),
    (b'{"inputs": {"input": [null]}}', "application/json", "not an array of numbers"),
    (b'{"inputs": {"input": [{"x": 1}]}}', "application/json", "not an array of numbers"),
    (b'{"inputs": {"input": [[1, 2, 3]]}}', "application/json", "has shape [1,3]"),
    (b'{"inputs": {"input": ' + ROW.encode() + b'}}', "application/json", "has shape [64]"),
    (b'{"inputs": {"input": [[[1e400]]]}}', "application/json", "has shape [1,1,1]"),
    (b"\x93NUMPY garbage", "application/x-npy", "not a application/x-npy"),
    (b"PK\x03\x04 broken", "application/x-npz", "not a application/x-npz"),
])
def test_a_body_that_does_not_fit_answers_400_naming_the_expected_inputs(api, body, ctype, says):
    status, doc = _post(api.port, "/v1/models/det/predict", body, ctype)
    assert status == 400, doc
    assert says in doc["error"]
    assert doc["error"].endswith("expected inputs {input: float32[?,64]}")
    assert doc["expected"] == "{input: float32[?,64]}"


@pytest.mark.parametrize("array", [
    np.zeros((1, 64), np.complex64),
    np.zeros((1, 32), np.float32),
    np.zeros((64,), np.float32),
])
def test_a_wrong_npy_array_answers_400_naming_dtype_and_shape(api, array):
    status, doc = _post(api.port, "/v1/models/det/predict", _npy(array), "application/x-npy")
    assert status == 400
    assert "float32[?,64]" in doc["error"]


def test_a_wider_or_integer_array_is_cast_to_the_models_dtype(api):
    with AgentClient(port=api.port) as c:
        assert c.predict_npy("det", np.ones((2, 64), np.float64)).outputs["output"].shape == (2, 10)
        r = c.predict("det", {"input": np.ones((1, 64), np.int64)})
        assert r.outputs["output"].shape == (1, 10)


def test_a_bad_input_never_counts_as_a_model_error(api):
    stats = api.serving.slots["det"].session.stats
    before = (stats.requests, stats.errors)
    for body in (b'{"inputs": {"input": [[1, 2, 3]]}}', b'{"inputs": {"input": [["x"]]}}'):
        assert _post(api.port, "/v1/models/det/predict", body)[0] == 400
    assert (stats.requests, stats.errors) == before


def test_a_bad_content_length_or_limit_answers_400(api):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    conn.putrequest("POST", "/v1/models/det/predict")
    conn.putheader("Content-Length", "-5")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400
    conn.close()
    with AgentClient(port=api.port) as c, pytest.raises(ApiError) as e:
        c._json("GET", "/v1/results?limit=lots")
    assert e.value.status == 400


def test_health_carries_the_broker_connection(tmp_path: Path):
    serving = Serving(results_size=1)
    server = InferenceApi(serving, list, port=0,
                          connection=lambda: {"url": "mqtt://b:1883", "connected": False,
                                              "cause": "connection refused"})
    server.start()
    try:
        with AgentClient(port=server.port) as c:
            assert c.health()["broker"] == {"url": "mqtt://b:1883", "connected": False,
                                            "cause": "connection refused"}
    finally:
        server.stop()
        serving.close()
