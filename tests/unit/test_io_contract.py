"""The IO contract manifests sign: the catalog's signature of a model equals what the agent's
runtime adapters report for the same file (ONNX Runtime, LiteRT), so a correct update is
never refused; golden input files are checked against the model's inputs before any write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from deltafleet.agent.runtime import load_model
from deltafleet.agent.serving import decode_golden, io_difference, io_signature
from deltafleet.server.catalog import GOLDEN_MAX_BYTES, inspect_model, load_golden, signature
from deltafleet.server.catalog import io_signature as catalog_signature
from deltafleet.server.errors import CatalogError
from tests.harness import modelgen


def _odd_io_model(path: Path) -> Path:
    """Static and named dims, two inputs, an int64 and a bool output."""
    w = numpy_helper.from_array(np.ones((3, 4), dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["a", "w"], ["y"]),
             helper.make_node("ArgMax", ["y"], ["idx"], axis=1),
             helper.make_node("Greater", ["b", "b"], ["flag"])]
    graph = helper.make_graph(
        nodes, "odd",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("b", TensorProto.INT32, [2, 5])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [2, 5])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import onnx

    onnx.save(model, path)
    return path


@pytest.mark.parametrize("make", ["mlp", "odd", "tflite"])
def test_catalog_signature_equals_what_the_runtime_reports(tmp_path: Path, make: str) -> None:
    if make == "mlp":
        path, fmt = modelgen.make_onnx_model(tmp_path / "m.onnx", size_mb=0.1), "onnx"
    elif make == "odd":
        path, fmt = _odd_io_model(tmp_path / "odd.onnx"), "onnx"
    else:
        path, fmt = modelgen.make_tflite_model(tmp_path / "m.tflite", seed=1), "tflite"
    signed = catalog_signature(inspect_model(path).to_json())
    assert signed is not None
    loaded = load_model(path, fmt)
    try:
        assert io_difference(io_signature(loaded), signed) is None, (io_signature(loaded), signed)
        assert loaded.signature.diff(signature(inspect_model(path).to_json())) == []
    finally:
        loaded.close()


def test_models_with_io_types_devices_name_differently_are_not_signed() -> None:
    info = {"inputs": [{"name": "text", "dtype": "string", "shape": [None]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 2]}]}
    assert catalog_signature(info) is None


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_golden_inputs_round_trip_to_the_agents_feeds(tmp_path: Path) -> None:
    model = modelgen.make_onnx_model(tmp_path / "m.onnx", size_mb=0.1)
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    golden = load_golden([_npz(tmp_path / "g.npz", input=x)], inspect_model(model).inputs)
    (feeds,) = decode_golden(tuple(golden))
    assert np.array_equal(feeds["input"], x)


@pytest.mark.parametrize(("arrays", "error"), [
    ({"other": np.zeros((1, 64), np.float32)}, "do not match the model inputs"),
    ({"input": np.zeros((1, 64), np.float64)}, "is float64, the model wants float32"),
    ({"input": np.zeros((1, 63), np.float32)}, "has shape \\[1, 63\\]"),
    ({"input": np.zeros((64,), np.float32)}, "has shape \\[64\\]"),
    ({"input": np.zeros((GOLDEN_MAX_BYTES // 256 + 1, 64), np.float32)}, "over the"),
])
def test_golden_inputs_that_do_not_fit_the_model_are_refused(tmp_path: Path, arrays, error) -> None:
    model = modelgen.make_onnx_model(tmp_path / "m.onnx", size_mb=0.1)
    with pytest.raises(CatalogError, match=error):
        load_golden([_npz(tmp_path / "g.npz", **arrays)], inspect_model(model).inputs)


def test_a_file_that_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    model = modelgen.make_onnx_model(tmp_path / "m.onnx", size_mb=0.1)
    bad = tmp_path / "g.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CatalogError, match="not a readable .npz"):
        load_golden([bad], inspect_model(model).inputs)
