"""Generate small, valid, deterministic ONNX and TFLite models for tests, demos and benchmarks,
and trained PyTorch Mobile (``.ptl``) classifiers (those need torch: the agent's torch extra).

Nothing is downloaded and no training framework is needed: ONNX models are built with
``onnx.helper`` and TFLite models with the ``tflite`` package's generated flatbuffer builders.
The same arguments always give byte-identical files, so content hashes are stable across runs.

``retrain_last_layer`` / ``retrain`` keep every byte of the model except the final layer's
weights, which is what a "fine-tuned head" update looks like: a binary delta between the two
versions is a small fraction of the full file.

Usage::

    python -m tests.harness.modelgen onnx OUT.onnx --size-mb 3 --seed 1 [--retrain-last-layer]
    python -m tests.harness.modelgen onnx-pair OUT_DIR --size-mb 3 --seed 1
    python -m tests.harness.modelgen tflite OUT.tflite --seed 1 [--retrain]
    python -m tests.harness.modelgen ptl-pair OUT_DIR --size-mb 0.5 --seed 1
    python -m tests.harness.modelgen digits OUT_DIR --seed 0     # trained on sklearn's digits
    python -m tests.harness.modelgen resnet50 OUT.onnx --seed 0  # ResNet-50-shaped, ~100 MB

``train_digits`` trains a real classifier (scikit-learn's MLPClassifier on the 8x8 digits that
ship inside scikit-learn) and ``make_digits_onnx`` / ``make_digits_tflite`` write its weights as
an ONNX graph (MatMul/Add/Relu) and a TFLite graph (FULLY_CONNECTED with fused ReLU); the
held-out split is what accuracy is measured on. ``make_resnet50_onnx`` builds the ResNet-50
architecture (batch-norm folded into the convolutions' biases) with He-initialised weights.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BYTES_PER_MB = 1024 * 1024  # size_mb is in MiB
PRODUCER_NAME = "deltafleet-modelgen"
PRODUCER_VERSION = "1"
TFLITE_SCHEMA_VERSION = 3
TFLITE_FILE_IDENTIFIER = b"TFL3"
_HIDDEN_LAYERS = 2
_MIN_HIDDEN = 4


def _hidden_width(size_mb: float, input_dim: int, output_dim: int) -> int:
    """Width h of the hidden layers so that all float32 parameters total about size_mb.

    Parameters of in -> h -> h -> out with biases:
    (H-1)*h^2 + (in + out + H) * h + out, with H hidden layers.
    """
    target_params = size_mb * BYTES_PER_MB / 4
    a = _HIDDEN_LAYERS - 1
    b = input_dim + output_dim + _HIDDEN_LAYERS
    c = output_dim - target_params
    h = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    return max(_MIN_HIDDEN, round(h))


def _layer(rng: np.random.Generator, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    scale = 1.0 / math.sqrt(fan_in)
    w = (rng.standard_normal((fan_in, fan_out)) * scale).astype(np.float32)
    b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
    return w, b


def make_onnx_model(
    path: Path | str,
    *,
    seed: int = 0,
    size_mb: float = 1.0,
    retrain_last_layer: bool = False,
    input_dim: int = 64,
    output_dim: int = 10,
    opset: int = 17,
) -> Path:
    """Write an MLP ``input [N, input_dim] -> output [N, output_dim]`` of about size_mb MiB.

    Layers are MatMul+Add+Relu, ..., MatMul+Add; weights are initializers inside the one file.
    With ``retrain_last_layer`` only the final MatMul/Add initializers differ (and
    ``model_version`` is 2 instead of 1), so the file has exactly the same size.
    """
    from onnx import TensorProto, helper, numpy_helper

    if size_mb <= 0 or input_dim <= 0 or output_dim <= 0:
        raise ValueError("size_mb, input_dim and output_dim must be positive")
    path = Path(path)
    hidden = _hidden_width(size_mb, input_dim, output_dim)
    dims = [input_dim] + [hidden] * _HIDDEN_LAYERS + [output_dim]
    rng = np.random.default_rng(seed)
    layers = [_layer(rng, dims[i], dims[i + 1]) for i in range(len(dims) - 1)]
    if retrain_last_layer:
        layers[-1] = _layer(np.random.default_rng([seed, 1]), dims[-2], dims[-1])

    nodes = []
    initializers = []
    x = "input"
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        w_name, b_name = f"fc{i}.weight", f"fc{i}.bias"
        initializers += [numpy_helper.from_array(w, w_name), numpy_helper.from_array(b, b_name)]
        mm, add = f"fc{i}.matmul", f"fc{i}.add"
        y = "output" if i == last else f"fc{i}.relu"
        nodes.append(helper.make_node("MatMul", [x, w_name], [mm], name=mm))
        nodes.append(helper.make_node("Add", [mm, b_name], [add if i != last else y], name=add))
        if i != last:
            nodes.append(helper.make_node("Relu", [add], [y], name=f"fc{i}.relu"))
        x = y

    graph = helper.make_graph(
        nodes,
        "deltafleet_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", input_dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", output_dim])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        model_version=2 if retrain_last_layer else 1,
        # Same length for both versions, so v1 and v2 files have exactly the same size.
        doc_string=(
            f"deltafleet synthetic MLP {'x'.join(map(str, dims))} seed={seed} "
            f"v{2 if retrain_last_layer else 1} (v2 = v1 with its last layer retrained)"
        ),
    )
    return save_checked(model, path)


def save_checked(model: Any, path: Path) -> Path:
    """Write ``model`` at the lowest IR version its opset allows (so older runtimes on devices
    load the file), after the ONNX checker passed it."""
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def make_onnx_pair(
    directory: Path | str, *, size_mb: float = 3.0, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``model-v1.onnx`` and ``model-v2.onnx`` (v2 = v1 with its last layer retrained)."""
    directory = Path(directory)
    v1 = make_onnx_model(directory / "model-v1.onnx", seed=seed, size_mb=size_mb)
    v2 = make_onnx_model(
        directory / "model-v2.onnx", seed=seed, size_mb=size_mb, retrain_last_layer=True
    )
    return v1, v2


def make_int8_variant(src: Path | str, dst: Path | str) -> Path:
    """The INT8 variant of an ONNX model (ONNX Runtime's dynamic quantization: INT8 weights,
    activations quantized at run time), about a quarter of its size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def make_permuted_classes(src: Path | str, dst: Path | str, classes: tuple[int, ...] = (0, 1, 2)
                          ) -> Path:
    """A copy of an ONNX classifier whose last layer's columns (weights and bias) for
    ``classes`` are rotated: it answers class ``classes[i+1]`` where the source answered
    ``classes[i]``, so it disagrees on every input whose top class is one of them (about
    ``len(classes)`` tenths of a balanced ten-class set). The same graph, shapes and size."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    last = max(int(n.split(".")[0][2:]) for n in inits if n.startswith("fc"))
    order = list(classes[1:]) + [classes[0]]
    for name in (f"fc{last}.weight", f"fc{last}.bias"):
        a = numpy_helper.to_array(inits[name]).copy()
        a[..., list(classes)] = a[..., order]
        inits[name].CopyFrom(numpy_helper.from_array(a, name))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def make_incompressible_onnx_model(path: Path | str, *, seed: int = 0,
                                   size_mb: float = 0.1) -> Path:
    """Write an ONNX model zstd cannot shrink: ``output = input + noise`` over uint8 vectors,
    with ``noise`` uniformly random bytes (what encrypted or already-compressed weights look
    like). Its full artifact is the file as it is."""
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    n = max(1, round(size_mb * BYTES_PER_MB))
    noise = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "noise"], ["output"], name="add_noise")],
        "deltafleet_noise",
        [helper.make_tensor_value_info("input", TensorProto.UINT8, [n])],
        [helper.make_tensor_value_info("output", TensorProto.UINT8, [n])],
        initializer=[numpy_helper.from_array(noise, "noise")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name=PRODUCER_NAME, producer_version=PRODUCER_VERSION)
    return save_checked(model, path)


def tflite_weights(
    *, seed: int = 0, input_dim: int = 8, output_dim: int = 4, retrain: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The (weights [output_dim, input_dim], bias [output_dim]) make_tflite_model embeds.

    Tests use these to compute the expected output ``x @ W.T + b`` with numpy.
    """
    rng = np.random.default_rng([seed, 1] if retrain else seed)
    w = (rng.standard_normal((output_dim, input_dim)) / math.sqrt(input_dim)).astype(np.float32)
    b = (rng.standard_normal(output_dim) * 0.1).astype(np.float32)
    return w, b


def _aligned_bytes(builder: Any, data: bytes, alignment: int = 16) -> int:
    """A [ubyte] vector whose first data byte sits on an ``alignment`` boundary of the file."""
    builder.StartVector(1, len(data), alignment)
    builder.head -= len(data)
    builder.Bytes[builder.head : builder.head + len(data)] = data
    return builder.EndVector()


def _finish_fc_model(builder: Any, path: Path, tensor_offsets: list[int],
                     operator_offsets: list[int], buffer_offsets: list[int], *, output: int,
                     description: str) -> Path:
    """The rest of a TFLite model of FULLY_CONNECTED operators: one subgraph (input tensor 0,
    output tensor ``output``), its operator code, the model table; written to ``path``."""
    import tflite

    def offsets_vector(offsets: list[int]) -> int:
        builder.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            builder.PrependUOffsetTRelative(off)
        return builder.EndVector()

    def int_vector(values: list[int]) -> int:
        builder.StartVector(4, len(values), 4)
        for v in reversed(values):
            builder.PrependInt32(v)
        return builder.EndVector()

    tensors_vec = offsets_vector(tensor_offsets)
    sg_inputs = int_vector([0])
    sg_outputs = int_vector([output])
    operators_vec = offsets_vector(operator_offsets)
    sg_name = builder.CreateString("main")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensors_vec)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, operators_vec)
    tflite.SubGraphAddName(builder, sg_name)
    subgraph_off = tflite.SubGraphEnd(builder)
    fc = tflite.BuiltinOperator.FULLY_CONNECTED
    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, fc)
    tflite.OperatorCodeAddBuiltinCode(builder, fc)
    tflite.OperatorCodeAddVersion(builder, 1)
    opcode_off = tflite.OperatorCodeEnd(builder)
    opcodes_vec = offsets_vector([opcode_off])
    subgraphs_vec = offsets_vector([subgraph_off])
    buffers_vec = offsets_vector(buffer_offsets)
    description_off = builder.CreateString(description)
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, TFLITE_SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(builder, opcodes_vec)
    tflite.ModelAddSubgraphs(builder, subgraphs_vec)
    tflite.ModelAddDescription(builder, description_off)
    tflite.ModelAddBuffers(builder, buffers_vec)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=TFLITE_FILE_IDENTIFIER)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(builder.Output()))
    return path


def _float_tensors(builder: Any, specs: list[tuple[str, list[int], int]]) -> list[int]:
    """FLOAT32 TFLite tensors (name, shape, buffer index) built into ``builder``: offsets."""
    import tflite  # noqa: PLC0415

    offsets = []
    for name, shape, buffer_index in specs:
        name_off = builder.CreateString(name)
        tflite.TensorStartShapeVector(builder, len(shape))
        for d in reversed(shape):
            builder.PrependInt32(d)
        shape_off = builder.EndVector()
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, shape_off)
        tflite.TensorAddType(builder, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(builder, buffer_index)
        tflite.TensorAddName(builder, name_off)
        offsets.append(tflite.TensorEnd(builder))
    return offsets

def make_tflite_model(
    path: Path | str,
    *,
    seed: int = 0,
    input_dim: int = 8,
    output_dim: int = 4,
    retrain: bool = False,
) -> Path:
    """Write a TFLite (schema 3) model: one float32 FULLY_CONNECTED ``[1,in] -> [1,out]``.

    Buffer 0 is the empty sentinel; weights and bias are constant buffers aligned to 16 bytes.
    """
    import flatbuffers
    import tflite

    path = Path(path)
    w, b = tflite_weights(seed=seed, input_dim=input_dim, output_dim=output_dim, retrain=retrain)
    builder = flatbuffers.Builder(1024)

    # Buffers: 0 = sentinel, 1 = weights, 2 = bias.
    buffer_offsets = []
    for data in (None, w.tobytes(), b.tobytes()):
        data_off = _aligned_bytes(builder, data) if data else None
        tflite.BufferStart(builder)
        if data_off is not None:
            tflite.BufferAddData(builder, data_off)
        buffer_offsets.append(tflite.BufferEnd(builder))

    # Tensors: 0 = input, 1 = weights, 2 = bias, 3 = output.
    tensor_specs = [
        ("input", [1, input_dim], 0),
        ("dense/weights", [output_dim, input_dim], 1),
        ("dense/bias", [output_dim], 2),
        ("output", [1, output_dim], 0),
    ]
    tensor_offsets = _float_tensors(builder, tensor_specs)

    tflite.FullyConnectedOptionsStart(builder)
    tflite.FullyConnectedOptionsAddFusedActivationFunction(
        builder, tflite.ActivationFunctionType.NONE
    )
    options_off = tflite.FullyConnectedOptionsEnd(builder)

    def int_vector(start: Callable[[Any, int], int], values: list[int]) -> int:
        start(builder, len(values))
        for v in reversed(values):
            builder.PrependInt32(v)
        return builder.EndVector()

    op_inputs = int_vector(tflite.OperatorStartInputsVector, [0, 1, 2])
    op_outputs = int_vector(tflite.OperatorStartOutputsVector, [3])
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, op_inputs)
    tflite.OperatorAddOutputs(builder, op_outputs)
    tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(builder, options_off)
    operator_off = tflite.OperatorEnd(builder)

    return _finish_fc_model(
        builder, path, tensor_offsets, [operator_off], buffer_offsets, output=3,
        description=(f"{PRODUCER_NAME} fully_connected {input_dim}->{output_dim} seed={seed}"
                     f"{' retrained' if retrain else ''}"))


# ------------------------------------------------------------ a real model: digits


@dataclass(frozen=True)
class DigitsModel:
    """A classifier trained on scikit-learn's digits: ``layers`` are (W [in, out], b) float32,
    ReLU between them, logits out; the data split it was trained and is measured on."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    x_train: np.ndarray  # float32 [n, 64], pixels / 16
    y_train: np.ndarray  # int64 [n]
    x_test: np.ndarray
    y_test: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = x.astype(np.float32)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0)
        return h

    def accuracy(self, x: np.ndarray | None = None, y: np.ndarray | None = None) -> float:
        x = self.x_test if x is None else x
        y = self.y_test if y is None else y
        return float(np.mean(self.logits(x).argmax(axis=1) == y))

    def with_layer(self, index: int, w: np.ndarray, b: np.ndarray) -> DigitsModel:
        layers = list(self.layers)
        layers[index] = (w.astype(np.float32), b.astype(np.float32))
        return DigitsModel(tuple(layers), self.x_train, self.y_train, self.x_test, self.y_test)


def train_digits(*, seed: int = 0, hidden: tuple[int, ...] = (64, 32),
                 max_iter: int = 400) -> DigitsModel:
    """Train an MLP on scikit-learn's packaged digits (no download): 70/30 stratified split."""
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed,
                                                        stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", max_iter=max_iter,
                        random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    layers = tuple((w.astype(np.float32), b.astype(np.float32))
                   for w, b in zip(clf.coefs_, clf.intercepts_, strict=True))
    return DigitsModel(layers, x_train, y_train, x_test, y_test)


def retrain_digits_head(model: DigitsModel, *, steps: int = 60, lr: float = 0.5,
                        seed: int = 1) -> DigitsModel:
    """v2 of a digits model: only the last layer retrained (softmax regression by gradient
    descent on the hidden features, from v1's head), as a fine-tuned head looks."""
    rng = np.random.default_rng(seed)
    h = model.x_train.astype(np.float32)
    for w, b in model.layers[:-1]:
        h = np.maximum(h @ w + b, 0)
    w, b = (a.astype(np.float64) for a in model.layers[-1])
    w = w + rng.standard_normal(w.shape) * 1e-3
    onehot = np.eye(w.shape[1])[model.y_train]
    for _ in range(steps):
        z = h @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(h)
        w -= lr * (h.T @ g)
        b -= lr * g.sum(axis=0)
    return model.with_layer(len(model.layers) - 1, w, b)


def make_digits_onnx(path: Path | str, model: DigitsModel, *, opset: int = 17,
                     version: int = 1) -> Path:
    """The digits model as ONNX: ``input`` float32 [N, 64] -> ``logits`` float32 [N, 10]."""
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    nodes, inits = [], []
    x = "input"
    last = len(model.layers) - 1
    for i, (w, b) in enumerate(model.layers):
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"),
                  numpy_helper.from_array(b, f"fc{i}.bias")]
        out = "logits" if i == last else f"fc{i}.relu"
        nodes.append(helper.make_node("MatMul", [x, f"fc{i}.weight"], [f"fc{i}.mm"],
                                      name=f"fc{i}.matmul"))
        nodes.append(helper.make_node("Add", [f"fc{i}.mm", f"fc{i}.bias"],
                                      [out if i == last else f"fc{i}.add"], name=f"fc{i}.add"))
        if i != last:
            nodes.append(helper.make_node("Relu", [f"fc{i}.add"], [out], name=f"fc{i}.relu"))
        x = out
    n_in, n_out = model.layers[0][0].shape[0], model.layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name=PRODUCER_NAME, producer_version=PRODUCER_VERSION,
                          model_version=version, doc_string="MLP trained on sklearn digits")
    return save_checked(m, path)


def make_digits_ptl(path: Path | str, model: DigitsModel) -> Path:
    """The digits model as PyTorch Mobile (TorchScript lite): ``input`` float32 [N, 64] ->
    ``logits`` float32 [N, 10], the same weights and IO as ``make_digits_onnx``. Needs torch."""
    import warnings

    import torch

    from deltafleet.agent.runtime_torch import io_extra_files
    from deltafleet.shared import TensorSpec

    torch.manual_seed(0)  # the archive's serialization id: same model, same bytes
    layers: list[Any] = []
    for i, (w, b) in enumerate(model.layers):
        fc = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            fc.bias.copy_(torch.from_numpy(b))
        layers.append(fc)
        if i < len(model.layers) - 1:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers).eval()
    n_in, n_out = model.layers[0][0].shape[0], model.layers[-1][0].shape[1]
    extra = io_extra_files([TensorSpec("input", "float32", (None, n_in))],
                           [TensorSpec("logits", "float32", (None, n_out))])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net)._save_for_lite_interpreter(str(path), _extra_files=extra)
    return path


def make_digits_tflite(path: Path | str, model: DigitsModel) -> Path:
    """The digits model as TFLite: FULLY_CONNECTED layers (fused ReLU between them),
    ``input`` float32 [1, 64] -> ``logits`` float32 [1, 10]."""
    layers = [(w.T.copy(), b) for w, b in model.layers]  # TFLite wants [out, in]
    return _write_tflite_fc_chain(Path(path), layers, f"{PRODUCER_NAME} digits mlp")


def _write_tflite_fc_chain(path: Path, layers: list[tuple[np.ndarray, np.ndarray]],
                           description: str) -> Path:
    import flatbuffers
    import tflite

    builder = flatbuffers.Builder(4096)
    blobs: list[bytes | None] = [None]
    for w, b in layers:
        blobs += [np.ascontiguousarray(w, np.float32).tobytes(),
                  np.ascontiguousarray(b, np.float32).tobytes()]
    buffer_offsets = []
    for data in blobs:
        data_off = _aligned_bytes(builder, data) if data else None
        tflite.BufferStart(builder)
        if data_off is not None:
            tflite.BufferAddData(builder, data_off)
        buffer_offsets.append(tflite.BufferEnd(builder))
    # tensors: input, then per layer weights, bias, output
    specs: list[tuple[str, list[int], int]] = [("input", [1, layers[0][0].shape[1]], 0)]
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        specs += [(f"fc{i}/weights", list(w.shape), 1 + 2 * i),
                  (f"fc{i}/bias", list(b.shape), 2 + 2 * i),
                  ("logits" if i == last else f"fc{i}/relu", [1, w.shape[0]], 0)]
    tensor_offsets = _float_tensors(builder, specs)

    def int_vector(values: list[int]) -> int:
        builder.StartVector(4, len(values), 4)
        for v in reversed(values):
            builder.PrependInt32(v)
        return builder.EndVector()

    operator_offsets = []
    for i in range(len(layers)):
        tflite.FullyConnectedOptionsStart(builder)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(
            builder, tflite.ActivationFunctionType.NONE if i == last
            else tflite.ActivationFunctionType.RELU)
        options_off = tflite.FullyConnectedOptionsEnd(builder)
        x = 0 if i == 0 else 3 * i
        op_inputs = int_vector([x, 3 * i + 1, 3 * i + 2])
        op_outputs = int_vector([3 * i + 3])
        tflite.OperatorStart(builder)
        tflite.OperatorAddOpcodeIndex(builder, 0)
        tflite.OperatorAddInputs(builder, op_inputs)
        tflite.OperatorAddOutputs(builder, op_outputs)
        tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.FullyConnectedOptions)
        tflite.OperatorAddBuiltinOptions(builder, options_off)
        operator_offsets.append(tflite.OperatorEnd(builder))

    return _finish_fc_model(builder, path, tensor_offsets, operator_offsets, buffer_offsets,
                            output=len(specs) - 1, description=description)


def save_digits_npz(directory: Path | str, model: DigitsModel, *,
                    calibration_samples: int = 64) -> dict[str, Path]:
    """``eval.npz`` (``input`` = the held-out split, ``labels``) and ``calibration.npz``
    (``input`` = the first training samples), as ``fleetctl model optimize`` reads them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"eval": directory / "eval.npz", "calibration": directory / "calibration.npz"}
    np.savez(paths["eval"], input=model.x_test, labels=model.y_test)
    np.savez(paths["calibration"], input=model.x_train[:calibration_samples])
    return paths


# ------------------------------------------------------------ ResNet-50-shaped ONNX


def make_resnet50_onnx(path: Path | str, *, seed: int = 0, num_classes: int = 1000) -> Path:
    """The ResNet-50 v1 architecture (bottlenecks [3, 4, 6, 3], batch norm folded into each
    convolution's bias) with He-initialised weights: ~25.5 M parameters, ~102 MB of FP32.
    The last convolution of each residual branch is scaled by 0.2 so activations stay bounded
    without batch norm. Input ``input`` [1, 3, 224, 224], output ``logits`` [1, num_classes]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits: list[Any] = []
    counter = [0]

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True,
             gain: float = 1.0) -> str:
        counter[0] += 1
        n = f"conv{counter[0]}"
        std = math.sqrt(2.0 / (cin * k * k)) * gain
        w = (rng.standard_normal((cout, cin, k, k), dtype=np.float32) * std).astype(np.float32)
        b = (rng.standard_normal(cout, dtype=np.float32) * 0.01).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{n}.weight"),
                      numpy_helper.from_array(b, f"{n}.bias")])
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{n}.weight", f"{n}.bias"], [f"{n}.out"],
                                      name=n, kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[pad] * 4))
        if not relu:
            return f"{n}.out"
        nodes.append(helper.make_node("Relu", [f"{n}.out"], [f"{n}.relu"], name=f"{n}.relu"))
        return f"{n}.relu"

    x = conv("input", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool1"], name="pool1", kernel_shape=[3, 3],
                                  strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "pool1", 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            cout = width * 4
            y = conv(x, cin, width, 1)
            y = conv(y, width, width, 3, stride)
            y = conv(y, width, cout, 1, relu=False, gain=0.2)
            shortcut = conv(x, cin, cout, 1, stride, relu=False) if block == 0 else x
            name = f"res{stage}_{block}"
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}.sum"], name=f"{name}.add"))
            nodes.append(helper.make_node("Relu", [f"{name}.sum"], [f"{name}.out"],
                                          name=f"{name}.relu"))
            x, cin = f"{name}.out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    w = (rng.standard_normal((cin, num_classes), dtype=np.float32) / math.sqrt(cin)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fc.weight"),
              numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc.bias")]
    nodes.append(helper.make_node("MatMul", ["flat", "fc.weight"], ["fc.mm"], name="fc.matmul"))
    nodes.append(helper.make_node("Add", ["fc.mm", "fc.bias"], ["logits"], name="fc.add"))
    graph = helper.make_graph(
        nodes, "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_classes])],
        initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                          producer_name=PRODUCER_NAME, producer_version=PRODUCER_VERSION)
    m.ir_version = helper.find_min_ir_version_for(m.opset_import)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(path))
    return path


# -- PyTorch Mobile (TorchScript lite, .ptl) -------------------------------------------------

PTL_CLASSES = 10


def ptl_dataset(*, seed: int = 0, n: int = 2048, input_dim: int = 64,
                classes: int = PTL_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """A labelled classification set (gaussian clusters around random centres), made from the
    seed alone: ``x [n, input_dim] float32``, ``y [n] int64``. The same seed gives the same set."""
    rng = np.random.default_rng([seed, 7])
    centres = rng.standard_normal((classes, input_dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.standard_normal((n, input_dim)).astype(np.float32) * 1.5
    return x.astype(np.float32), y.astype(np.int64)


def ptl_classifier(*, seed: int = 0, size_mb: float = 0.5, input_dim: int = 64,
                   retrain_head: bool = False, steps: int = 60) -> Any:
    """A trained torch MLP classifier ``input [N, input_dim] -> probs [N, 10]`` (softmax) of
    about ``size_mb`` MiB of float32 weights, trained on the first 3/4 of ``ptl_dataset``.
    ``retrain_head``: then its last layer alone trained further (a fine-tuned head: the other
    layers' bytes stay the same, so a delta from v1 is small). Needs torch."""
    import torch

    torch.set_num_threads(1)  # as the agent runs it; more threads only contend on a busy CI box
    torch.manual_seed(seed)
    hidden = _hidden_width(size_mb, input_dim, PTL_CLASSES)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc0 = torch.nn.Linear(input_dim, hidden)
            self.fc1 = torch.nn.Linear(hidden, hidden)
            self.head = torch.nn.Linear(hidden, PTL_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(torch.relu(self.fc0(x))))
            return torch.softmax(self.head(h), dim=-1)

    x, y = ptl_dataset(seed=seed, input_dim=input_dim)
    xt, yt = torch.from_numpy(x[: len(x) * 3 // 4]), torch.from_numpy(y[: len(y) * 3 // 4])
    model = Classifier()

    def train(params: Any, n_steps: int, lr: float) -> None:
        opt = torch.optim.Adam(params, lr=lr)
        for step in range(n_steps):  # mini-batches of 128, in order: deterministic
            lo = step * 128 % len(xt)
            xb, yb = xt[lo:lo + 128], yt[lo:lo + 128]
            opt.zero_grad()
            logits = model.head(torch.relu(model.fc1(torch.relu(model.fc0(xb)))))
            torch.nn.functional.cross_entropy(logits, yb).backward()
            opt.step()

    with torch.inference_mode(False), torch.enable_grad():  # also when called under either
        train(model.parameters(), steps, 1e-3)
        if retrain_head:
            train(model.head.parameters(), steps // 2, 1e-3)
    return model.eval()


def ptl_accuracy(model: Any, *, seed: int = 0, input_dim: int = 64) -> float:
    """Top-1 accuracy of a ``ptl_classifier`` (or anything that maps x to probs) on the held-out
    last quarter of ``ptl_dataset``."""
    import torch

    x, y = ptl_dataset(seed=seed, input_dim=input_dim)
    xv, yv = x[len(x) * 3 // 4:], y[len(y) * 3 // 4:]
    with torch.inference_mode():
        probs = np.asarray(model(torch.from_numpy(xv)))
    return float((probs.argmax(axis=1) == yv).mean())


def make_ptl_model(path: Path | str, *, seed: int = 0, size_mb: float = 0.5,
                   input_dim: int = 64, retrain_head: bool = False,
                   misbehave: str | None = None) -> Path:
    """Write a trained ``ptl_classifier`` as a TorchScript-lite file (``torch.jit.script`` +
    ``_save_for_lite_interpreter``) with its IO contract as the agent reads it
    (``input [N, input_dim] float32 -> probs [N, 10] float32``). Needs torch.

    ``misbehave``: ``"nan_on_negative"`` answers NaN for any input row with a negative value
    (all-zero warm-up inputs pass; live traffic fails), ``"wrong_shape"`` returns 5 columns
    where it declares 10. ``optimize_for_mobile`` is not applied: this CPU build of torch has
    no XNNPACK and refuses it. The same arguments and output path give the same bytes
    (``torch.manual_seed(seed)`` also seeds the random half of ``.data/serialization_id``).
    """
    import warnings

    import torch

    from deltafleet.agent.runtime_torch import io_extra_files
    from deltafleet.shared import TensorSpec

    net = ptl_classifier(seed=seed, size_mb=size_mb, input_dim=input_dim,
                         retrain_head=retrain_head)

    class NanOnNegative(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.net(x)
            bad = (x < 0).any(dim=1, keepdim=True)
            return torch.where(bad, torch.full_like(p, float("nan")), p)

    class WrongShape(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)[:, :5]

    wrappers = {None: lambda: net, "nan_on_negative": NanOnNegative, "wrong_shape": WrongShape}
    if misbehave not in wrappers:
        raise ValueError(f"misbehave must be one of {sorted(k for k in wrappers if k)} or None")
    module = wrappers[misbehave]().eval()
    extra = io_extra_files([TensorSpec("input", "float32", (None, input_dim))],
                           [TensorSpec("probs", "float32", (None, PTL_CLASSES))])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jit.script, lite interpreter
        torch.jit.script(module)._save_for_lite_interpreter(str(path), _extra_files=extra)
    return path


def make_ptl_pair(directory: Path | str, *, size_mb: float = 0.5,
                  seed: int = 0) -> tuple[Path, Path]:
    """Write ``model-v1.ptl`` and ``model-v2.ptl`` (v2 = v1 with its head trained further)."""
    directory = Path(directory)
    return (make_ptl_model(directory / "model-v1.ptl", seed=seed, size_mb=size_mb),
            make_ptl_model(directory / "model-v2.ptl", seed=seed, size_mb=size_mb,
                           retrain_head=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("onnx", help="one ONNX MLP")
    p.add_argument("out", type=Path)
    p.add_argument("--size-mb", type=float, default=1.0, help="approximate weight size in MiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain-last-layer", action="store_true")
    p.add_argument("--input-dim", type=int, default=64)
    p.add_argument("--output-dim", type=int, default=10)
    p.add_argument("--opset", type=int, default=17)
    p = sub.add_parser("onnx-pair", help="model-v1.onnx and model-v2.onnx (last layer retrained)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--size-mb", type=float, default=3.0, help="approximate weight size in MiB")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("ptl-pair", help="model-v1.ptl and model-v2.ptl: trained PyTorch Mobile "
                       "classifiers, v2's head trained further (needs torch)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--size-mb", type=float, default=0.5, help="approximate weight size in MiB")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("tflite", help="one TFLite FULLY_CONNECTED model")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-dim", type=int, default=8)
    p.add_argument("--output-dim", type=int, default=4)
    p.add_argument("--retrain", action="store_true")
    p = sub.add_parser("digits", help="digits-v1/v2 .onnx/.tflite + eval.npz, calibration.npz")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("resnet50", help="a ResNet-50-shaped FP32 ONNX (~100 MB)")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.kind == "onnx":
        paths = [make_onnx_model(args.out, seed=args.seed, size_mb=args.size_mb,
                                 retrain_last_layer=args.retrain_last_layer,
                                 input_dim=args.input_dim, output_dim=args.output_dim,
                                 opset=args.opset)]
    elif args.kind == "digits":
        v1 = train_digits(seed=args.seed)
        v2 = retrain_digits_head(v1)
        paths = [make_digits_onnx(args.out_dir / "digits-v1.onnx", v1),
                 make_digits_onnx(args.out_dir / "digits-v2.onnx", v2, version=2),
                 make_digits_tflite(args.out_dir / "digits-v1.tflite", v1),
                 make_digits_tflite(args.out_dir / "digits-v2.tflite", v2),
                 *save_digits_npz(args.out_dir, v1).values()]
    elif args.kind == "resnet50":
        paths = [make_resnet50_onnx(args.out, seed=args.seed)]
    elif args.kind == "onnx-pair":
        paths = list(make_onnx_pair(args.out_dir, size_mb=args.size_mb, seed=args.seed))
    elif args.kind == "ptl-pair":
        paths = list(make_ptl_pair(args.out_dir, size_mb=args.size_mb, seed=args.seed))
    else:
        paths = [make_tflite_model(args.out, seed=args.seed, input_dim=args.input_dim,
                                   output_dim=args.output_dim, retrain=args.retrain)]
    for p_ in paths:
        print(f"{p_}\t{p_.stat().st_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
