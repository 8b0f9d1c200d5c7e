"""Runtime adapters load generated models, compute the right numbers and fail in one line."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from deltafleet.agent import runtime
from deltafleet.agent.errors import ModelRuntimeError
from deltafleet.agent.runtime import (
    LoadedModel,
    available_runtimes,
    load_model,
    zero_feeds,
)
from deltafleet.agent.serving import check_outputs
from deltafleet.shared import TensorSpec
from tests.harness import modelgen


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return modelgen.make_onnx_model(tmp_path_factory.mktemp("onnx") / "m.onnx", size_mb=0.2)


@pytest.fixture(scope="module")
def tflite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return modelgen.make_tflite_model(tmp_path_factory.mktemp("tfl") / "m.tflite", seed=3)


def _expected_tflite(x: np.ndarray, *, seed: int = 3, retrain: bool = False) -> np.ndarray:
    w, b = modelgen.tflite_weights(seed=seed, retrain=retrain)
    return x @ w.T + b


def smoke_test(model: LoadedModel) -> dict[str, np.ndarray]:
    """One inference on zero inputs, its answer checked as the agent checks every answer."""
    outputs = model.run(zero_feeds(model))
    check_outputs(model, outputs)
    return outputs


def _x(batch: int = 1) -> np.ndarray:
    return np.linspace(-1, 1, batch * 8, dtype=np.float32).reshape(batch, 8)


# ------------------------------------------------------------------------------------ ONNX


def test_onnx_model_loads_in_onnxruntime(onnx_path: Path) -> None:
    with load_model(onnx_path, "onnx") as model:
        assert isinstance(model, LoadedModel)
        assert (model.format, model.runtime) == ("onnx", "onnxruntime")
        assert model.inputs == (TensorSpec("input", "float32", (None, 64)),)
        assert model.outputs == (TensorSpec("output", "float32", (None, 10)),)


def test_onnx_smoke_test_gives_one_finite_row(onnx_path: Path) -> None:
    with load_model(onnx_path, "onnx") as model:
        feeds = zero_feeds(model)
        assert feeds["input"].shape == (1, 64) and feeds["input"].dtype == np.float32
        out = smoke_test(model)
        assert out["output"].shape == (1, 10)
        assert np.all(np.isfinite(out["output"]))


def test_onnx_runs_a_dynamic_batch(onnx_path: Path) -> None:
    with load_model(onnx_path, "onnx") as model:
        x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
        batch = model.run({"input": x})["output"]
        single = model.run({"input": x[2:3]})["output"]
        assert batch.shape == (5, 10)
        np.testing.assert_allclose(batch[2:3], single, rtol=1e-5, atol=1e-6)


def test_onnx_bad_feed_is_a_runtime_error(onnx_path: Path) -> None:
    with load_model(onnx_path, "onnx") as model, pytest.raises(ModelRuntimeError):
        model.run({"input": np.zeros((1, 3), np.float32)})


def test_smoke_test_rejects_non_finite_outputs(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])],
        "log_of_zero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    path = tmp_path / "log.onnx"
    path.write_bytes(model_proto.SerializeToString())
    with load_model(path, "onnx") as model, pytest.raises(ModelRuntimeError, match="NaN or Inf"):
        smoke_test(model)


# ---------------------------------------------------------------------------------- TFLite


def test_tflite_prefers_litert(tflite_path: Path) -> None:
    with load_model(tflite_path, "tflite") as model:
        assert (model.format, model.runtime) == ("tflite", "litert")
        assert model.inputs == (TensorSpec("input", "float32", (1, 8)),)
        assert model.outputs == (TensorSpec("output", "float32", (1, 4)),)


def test_litert_computes_the_fully_connected_layer(tflite_path: Path) -> None:
    with load_model(tflite_path, "tflite", prefer="litert") as model:
        out = model.run({"input": _x()})["output"]
        np.testing.assert_allclose(out, _expected_tflite(_x()), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            smoke_test(model)["output"], _expected_tflite(np.zeros((1, 8), np.float32))
        )


def test_litert_resizes_for_another_batch(tflite_path: Path) -> None:
    with load_model(tflite_path, "tflite", prefer="litert") as model:
        out = model.run({"input": _x(3)})["output"]
        np.testing.assert_allclose(out, _expected_tflite(_x(3)), rtol=1e-5, atol=1e-6)
        out = model.run({"input": _x(1)})["output"]
        np.testing.assert_allclose(out, _expected_tflite(_x(1)), rtol=1e-5, atol=1e-6)


def test_litert_runs_retrained_weights(tmp_path: Path) -> None:
    path = modelgen.make_tflite_model(tmp_path / "v2.tflite", seed=3, retrain=True)
    with load_model(path, "tflite", prefer="litert") as model:
        out = model.run({"input": _x()})["output"]
    np.testing.assert_allclose(out, _expected_tflite(_x(), retrain=True), rtol=1e-5, atol=1e-6)


def test_tflite_runs_are_serialised_across_threads(tflite_path: Path) -> None:
    expected = _expected_tflite(_x(2))
    errors: list[BaseException] = []
    with load_model(tflite_path, "tflite", prefer="litert") as model:

        def work() -> None:
            try:
                for _ in range(50):
                    np.testing.assert_allclose(
                        model.run({"input": _x(2)})["output"], expected, rtol=1e-5, atol=1e-6
                    )
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_tflite_missing_input_is_a_runtime_error(tflite_path: Path) -> None:
    with (
        load_model(tflite_path, "tflite", prefer="litert") as model,
        pytest.raises(ModelRuntimeError, match="missing inputs"),
    ):
        model.run({})


def test_tflite_runtime_computes_the_fully_connected_layer(tflite_path: Path) -> None:
    with load_model(tflite_path, "tflite", prefer="tflite-runtime") as model:
        assert model.runtime == "tflite-runtime"
        out = model.run({"input": _x()})["output"]
        np.testing.assert_allclose(out, _expected_tflite(_x()), rtol=1e-5, atol=1e-6)
        assert smoke_test(model)["output"].shape == (1, 4)


# ------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_corrupt_file_is_a_runtime_error(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"corrupt.{fmt}"
    path.write_bytes(b"\x10\x00\x00\x00TFL3" + np.random.default_rng(2).bytes(512))
    with pytest.raises(ModelRuntimeError) as info:
        load_model(path, fmt)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_truncated_model_is_a_runtime_error(
    tmp_path: Path, fmt: str, onnx_path: Path, tflite_path: Path
) -> None:
    source = onnx_path if fmt == "onnx" else tflite_path
    path = tmp_path / f"truncated.{fmt}"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ModelRuntimeError):
        load_model(path, fmt)


def test_missing_file_and_unknown_format_are_runtime_errors(
    tmp_path: Path, onnx_path: Path
) -> None:
    with pytest.raises(ModelRuntimeError, match="does not exist"):
        load_model(tmp_path / "nope.onnx", "onnx")
    with pytest.raises(ModelRuntimeError, match="unknown model format"):
        load_model(onnx_path, "pt")
    with pytest.raises(ModelRuntimeError, match="cannot run onnx"):
        load_model(onnx_path, "onnx", prefer="litert")


def test_missing_tflite_runtime_says_what_to_install(
    tflite_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        if name.split(".")[0] in ("ai_edge_litert", "tflite_runtime"):
            return None
        return real_find_spec(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime.importlib.util, "find_spec", find_spec)
    for module in (
        "ai_edge_litert",
        "ai_edge_litert.interpreter",
        "tflite_runtime",
        "tflite_runtime.interpreter",
    ):
        monkeypatch.setitem(sys.modules, module, None)  # type: ignore[arg-type]

    assert "litert" not in available_runtimes()
    with pytest.raises(ModelRuntimeError) as info:
        load_model(tflite_path, "tflite")
    assert str(info.value) == (
        "no runtime for tflite installed: pip install deltafleet-agent[litert]"
    )
    with pytest.raises(ModelRuntimeError, match=r"pip install deltafleet-agent\[litert\]"):
        load_model(tflite_path, "tflite", prefer="litert")


def test_available_runtimes_reports_installed_versions() -> None:
    found = available_runtimes()
    assert set(found) <= set(runtime.RUNTIMES)
    assert {"onnxruntime", "litert"} <= set(found)
    assert all(isinstance(v, str) and v[0].isdigit() for v in found.values())


def test_closed_model_refuses_to_run(onnx_path: Path, tflite_path: Path) -> None:
    for path, fmt in ((onnx_path, "onnx"), (tflite_path, "tflite")):
        model = load_model(path, fmt)
        feeds = zero_feeds(model)
        model.close()
        with pytest.raises(ModelRuntimeError, match="closed"):
            model.run(feeds)
