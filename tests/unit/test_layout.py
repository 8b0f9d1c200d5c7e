"""The ONNX layout walker finds weights wherever exporters put them: initializers, and
Constant node attributes in the main graph and inside If subgraphs (silero-vad does this)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deltafleet.codecs import FileSource, decode_sha256
from deltafleet.server.codecs import TensorXorEncoder
from deltafleet.server.codecs.layout import model_tensors
from deltafleet.shared import sha256_file


def _constant(name: str, values: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(values))


def _model(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    w_init = rng.standard_normal((64, 64)).astype(np.float32)
    w_then = rng.standard_normal((64, 64)).astype(np.float32)
    w_else = rng.standard_normal((64, 64)).astype(np.float32)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    then_g = helper.make_graph([_constant("wt", w_then),
                                helper.make_node("MatMul", ["x", "wt"], ["y_then"])],
                               "then", [], [helper.make_tensor_value_info(
                                   "y_then", TensorProto.FLOAT, [1, 64])])
    else_g = helper.make_graph([_constant("we", w_else),
                                helper.make_node("MatMul", ["x", "we"], ["y_else"])],
                               "else", [], [helper.make_tensor_value_info(
                                   "y_else", TensorProto.FLOAT, [1, 64])])
    nodes = [
        helper.make_node("MatMul", ["x0", "w_init"], ["x"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [out], [numpy_helper.from_array(w_init, "w_init")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_walker_finds_initializers_and_constants_in_subgraphs(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", 1)
    with FileSource(path) as src:
        fmt, tensors = model_tensors(src)  # type: ignore[misc]
        data = path.read_bytes()
    assert fmt == "onnx"
    assert [t.length for t in tensors] == [64 * 64 * 4] * 3
    assert [t.offset for t in tensors] == sorted(t.offset for t in tensors)
    found = {bytes(data[t.offset:t.offset + t.length]) for t in tensors}
    model = onnx.load(path)
    then_w = model.graph.node[1].attribute[0].g.node[0].attribute[0].t.raw_data
    assert model.graph.initializer[0].raw_data in found and then_w in found
    assert {t.name for t in tensors} >= {"w_init", "wt", "we"}


def test_constants_in_subgraphs_are_diffed_as_tensors(tmp_path: Path) -> None:
    base = _model(tmp_path / "base.onnx", 1)
    target = _model(tmp_path / "target.onnx", 1)
    model = onnx.load(target)
    then_t = model.graph.node[1].attribute[0].g.node[0].attribute[0].t
    w = numpy_helper.to_array(then_t).copy()
    w += np.float32(1e-4)  # a fine-tune of one branch's weights
    then_t.CopyFrom(numpy_helper.from_array(w))
    onnx.save(model, target)
    out = tmp_path / "delta"
    TensorXorEncoder().encode(base, target, out)
    assert out.stat().st_size < 0.5 * target.stat().st_size / 3  # only one tensor changed
    assert decode_sha256("tensor-xor", out, base) == (sha256_file(target), target.stat().st_size)
