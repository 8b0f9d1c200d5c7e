"""modelgen makes valid models; the catalog tells valid models from everything else."""

from __future__ import annotations

import json
from pathlib import Path

import bsdiff4
import flatbuffers
import numpy as np
import onnx
import pytest
import tflite
from onnx import TensorProto, helper, numpy_helper

from deltafleet.server.catalog import ModelInfo, detect_format, inspect_model
from deltafleet.server.errors import CatalogError
from deltafleet.shared import TensorSpec, sha256_file
from tests.harness import modelgen

MB = modelgen.BYTES_PER_MB


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return modelgen.make_onnx_pair(tmp_path_factory.mktemp("pair"), size_mb=3.0, seed=7)


@pytest.fixture(scope="module")
def tflite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return modelgen.make_tflite_model(tmp_path_factory.mktemp("tfl") / "fc.tflite", seed=3)


def _assert_rejected(path: Path) -> str:
    with pytest.raises(CatalogError) as info:
        inspect_model(path)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# ------------------------------------------------------------------------------ generator


def test_onnx_model_has_requested_size_and_signature(onnx_pair: tuple[Path, Path]) -> None:
    v1, _ = onnx_pair
    size = v1.stat().st_size
    assert abs(size - 3 * MB) / (3 * MB) < 0.03

    info = inspect_model(v1)
    assert info.format == "onnx"
    assert info.size_bytes == size
    assert info.sha256 == sha256_file(v1)
    assert info.inputs == (TensorSpec("input", "float32", ("N", 64)),)
    assert info.outputs == (TensorSpec("output", "float32", ("N", 10)),)
    assert info.ops == ("Add", "MatMul", "Relu")
    assert info.opset == {"ai.onnx": 17}
    assert info.ir_version == 8
    assert info.producer is not None and info.producer.startswith(modelgen.PRODUCER_NAME)
    assert info.tflite_schema_version is None
    assert abs(info.param_count * 4 - size) / size < 0.01


def test_onnx_model_stores_weights_inside_the_file(onnx_pair: tuple[Path, Path]) -> None:
    model = onnx.load(str(onnx_pair[0]), load_external_data=False)
    assert model.graph.initializer
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    assert model.model_version == 1 and model.doc_string


def test_small_onnx_model_respects_custom_dims(tmp_path: Path) -> None:
    path = modelgen.make_onnx_model(
        tmp_path / "m.onnx", size_mb=0.05, input_dim=16, output_dim=3, opset=13
    )
    info = inspect_model(path)
    assert info.inputs[0].shape == ("N", 16)
    assert info.outputs[0].shape == ("N", 3)
    assert info.opset == {"ai.onnx": 13}
    assert abs(path.stat().st_size - 0.05 * MB) / (0.05 * MB) < 0.1


def test_onnx_generation_is_deterministic(tmp_path: Path) -> None:
    a = modelgen.make_onnx_model(tmp_path / "a.onnx", seed=5, size_mb=0.2)
    b = modelgen.make_onnx_model(tmp_path / "b.onnx", seed=5, size_mb=0.2)
    c = modelgen.make_onnx_model(tmp_path / "c.onnx", seed=6, size_mb=0.2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_pair_differs_only_in_the_last_layer(onnx_pair: tuple[Path, Path]) -> None:
    v1, v2 = onnx_pair
    assert v1.stat().st_size == v2.stat().st_size
    assert sha256_file(v1) != sha256_file(v2)

    m1, m2 = onnx.load(str(v1)), onnx.load(str(v2))
    w1 = {t.name: numpy_helper.to_array(t) for t in m1.graph.initializer}
    w2 = {t.name: numpy_helper.to_array(t) for t in m2.graph.initializer}
    assert w1.keys() == w2.keys()
    last = sorted({name.split(".")[0] for name in w1})[-1]
    changed = {name for name in w1 if not np.array_equal(w1[name], w2[name])}
    assert changed == {f"{last}.weight", f"{last}.bias"}
    assert m1.graph.node == m2.graph.node
    assert (m1.model_version, m2.model_version) == (1, 2)

    i1, i2 = inspect_model(v1), inspect_model(v2)
    assert (i1.inputs, i1.outputs, i1.ops, i1.param_count) == (
        i2.inputs,
        i2.outputs,
        i2.ops,
        i2.param_count,
    )


def test_pair_delta_is_far_smaller_than_the_model(onnx_pair: tuple[Path, Path]) -> None:
    v1, v2 = onnx_pair
    full = v2.read_bytes()
    delta = bsdiff4.diff(v1.read_bytes(), full)
    assert len(delta) < 0.15 * len(full)
    assert bsdiff4.patch(v1.read_bytes(), delta) == full


def test_cli_writes_an_onnx_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.onnx"
    assert modelgen.main(["onnx", str(out), "--size-mb", "0.1", "--seed", "1"]) == 0
    assert inspect_model(out).format == "onnx"
    assert str(out) in capsys.readouterr().out


# -------------------------------------------------------------------------------- TFLite


def test_tflite_model_is_inspected(tflite_path: Path) -> None:
    info = inspect_model(tflite_path)
    assert info.format == "tflite"
    assert info.ops == ("FULLY_CONNECTED",)
    assert info.inputs == (TensorSpec("input", "float32", (1, 8)),)
    assert info.outputs == (TensorSpec("output", "float32", (1, 4)),)
    assert info.param_count == 8 * 4 + 4
    assert info.tflite_schema_version == 3
    assert (info.ir_version, info.opset) == (None, None)
    assert info.size_bytes == tflite_path.stat().st_size
    assert info.sha256 == sha256_file(tflite_path)


def test_tflite_weight_buffers_are_aligned_and_hold_the_weights(tflite_path: Path) -> None:
    data = tflite_path.read_bytes()
    model = tflite.Model.GetRootAs(data, 0)
    assert model.Buffers(0).DataLength() == 0  # the empty sentinel
    w, b = modelgen.tflite_weights(seed=3)
    for index, expected in ((1, w), (2, b)):
        buffer = model.Buffers(index)
        start = buffer._tab.Vector(buffer._tab.Offset(4))
        assert start % 16 == 0
        stored = np.frombuffer(data, np.float32, expected.size, start)
        assert np.array_equal(stored, expected.ravel())


def test_tflite_retrain_changes_only_weights(tmp_path: Path) -> None:
    a = modelgen.make_tflite_model(tmp_path / "a.tflite", seed=3)
    b = modelgen.make_tflite_model(tmp_path / "b.tflite", seed=3, retrain=True)
    assert a.read_bytes() != b.read_bytes()
    ia, ib = inspect_model(a), inspect_model(b)
    assert (ia.inputs, ia.outputs, ia.ops) == (ib.inputs, ib.outputs, ib.ops)


def test_format_is_detected_by_content_not_name(
    tmp_path: Path, onnx_pair: tuple[Path, Path], tflite_path: Path
) -> None:
    disguised = tmp_path / "model.onnx"
    disguised.write_bytes(tflite_path.read_bytes())
    assert detect_format(disguised) == "tflite"
    blob = tmp_path / "blob"
    blob.write_bytes(onnx_pair[0].read_bytes())
    assert detect_format(blob) == "onnx"
    assert inspect_model(blob).format == "onnx"


def test_model_info_to_json_is_plain_json(tflite_path: Path, onnx_pair: tuple[Path, Path]) -> None:
    for path in (tflite_path, onnx_pair[0]):
        info = inspect_model(path)
        doc = info.to_json()
        assert json.loads(json.dumps(doc)) == doc
        assert isinstance(doc["inputs"][0]["shape"], list)
        assert isinstance(doc["ops"], list)
        assert set(doc) == set(ModelInfo.__slots__)


# ------------------------------------------------------------------------------ rejection


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _assert_rejected(empty)
    with pytest.raises(CatalogError):
        detect_format(empty)


def test_garbage_is_rejected(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_rejected(garbage)
    text = tmp_path / "readme.onnx"
    text.write_bytes(b"this is not a model\n" * 10)
    _assert_rejected(text)


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    _assert_rejected(tmp_path / "nope.onnx")


def test_truncated_onnx_is_rejected(tmp_path: Path, onnx_pair: tuple[Path, Path]) -> None:
    data = onnx_pair[0].read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 100):
        truncated = tmp_path / f"cut{cut}.onnx"
        truncated.write_bytes(data[:cut])
        _assert_rejected(truncated)


def test_onnx_failing_the_checker_is_rejected(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["not_defined_anywhere"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    assert "checker" in _assert_rejected(path)


def test_onnx_with_wrong_input_count_is_rejected(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x"], ["y"])],
        "bad_arity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "arity.onnx"
    path.write_bytes(model.SerializeToString())
    _assert_rejected(path)


def test_truncated_tflite_is_rejected(tmp_path: Path, tflite_path: Path) -> None:
    data = tflite_path.read_bytes()
    for cut in (12, 40, len(data) // 2):
        truncated = tmp_path / f"cut{cut}.tflite"
        truncated.write_bytes(data[:cut])
        _assert_rejected(truncated)


def test_tflite_identifier_with_garbage_body_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "fake.tflite"
    path.write_bytes(b"\x10\x00\x00\x00TFL3" + np.random.default_rng(1).bytes(2048))
    _assert_rejected(path)


def test_tflite_without_subgraph_is_rejected(tmp_path: Path) -> None:
    builder = flatbuffers.Builder(64)
    tflite.BufferStart(builder)
    sentinel = tflite.BufferEnd(builder)
    tflite.ModelStartBuffersVector(builder, 1)
    builder.PrependUOffsetTRelative(sentinel)
    buffers = builder.EndVector()
    tflite.ModelStartSubgraphsVector(builder, 0)
    subgraphs = builder.EndVector()
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddSubgraphs(builder, subgraphs)
    tflite.ModelAddBuffers(builder, buffers)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=b"TFL3")
    path = tmp_path / "nosubgraph.tflite"
    path.write_bytes(bytes(builder.Output()))
    assert "subgraph" in _assert_rejected(path)
