"""Generate small, valid, deterministic ONNX and TFLite models for tests, demos and benchmarks.

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
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
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
    import onnx
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
    # The lowest IR version this opset allows, so older runtimes on devices can load the file.
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


def make_incompressible_onnx_model(path: Path | str, *, seed: int = 0,
                                   size_mb: float = 0.1) -> Path:
    """Write an ONNX model zstd cannot shrink: ``output = input + noise`` over uint8 vectors,
    with ``noise`` uniformly random bytes (what encrypted or already-compressed weights look
    like). Its full artifact is the file as it is."""
    import onnx
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
    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


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
    tensor_offsets = []
    for name, shape, buffer_index in tensor_specs:
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
        tensor_offsets.append(tflite.TensorEnd(builder))

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

    tflite.SubGraphStartTensorsVector(builder, len(tensor_offsets))
    for off in reversed(tensor_offsets):
        builder.PrependUOffsetTRelative(off)
    tensors_vec = builder.EndVector()
    sg_inputs = int_vector(tflite.SubGraphStartInputsVector, [0])
    sg_outputs = int_vector(tflite.SubGraphStartOutputsVector, [3])
    tflite.SubGraphStartOperatorsVector(builder, 1)
    builder.PrependUOffsetTRelative(operator_off)
    operators_vec = builder.EndVector()
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

    tflite.ModelStartOperatorCodesVector(builder, 1)
    builder.PrependUOffsetTRelative(opcode_off)
    opcodes_vec = builder.EndVector()
    tflite.ModelStartSubgraphsVector(builder, 1)
    builder.PrependUOffsetTRelative(subgraph_off)
    subgraphs_vec = builder.EndVector()
    tflite.ModelStartBuffersVector(builder, len(buffer_offsets))
    for off in reversed(buffer_offsets):
        builder.PrependUOffsetTRelative(off)
    buffers_vec = builder.EndVector()
    description = builder.CreateString(
        f"{PRODUCER_NAME} fully_connected {input_dim}->{output_dim} seed={seed}"
        f"{' retrained' if retrain else ''}"
    )
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, TFLITE_SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(builder, opcodes_vec)
    tflite.ModelAddSubgraphs(builder, subgraphs_vec)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, buffers_vec)
    model_off = tflite.ModelEnd(builder)
    builder.Finish(model_off, file_identifier=TFLITE_FILE_IDENTIFIER)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(builder.Output()))
    return path


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
    p = sub.add_parser("tflite", help="one TFLite FULLY_CONNECTED model")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-dim", type=int, default=8)
    p.add_argument("--output-dim", type=int, default=4)
    p.add_argument("--retrain", action="store_true")
    args = parser.parse_args(argv)

    if args.kind == "onnx":
        paths = [
            make_onnx_model(
                args.out,
                seed=args.seed,
                size_mb=args.size_mb,
                retrain_last_layer=args.retrain_last_layer,
                input_dim=args.input_dim,
                output_dim=args.output_dim,
                opset=args.opset,
            )
        ]
    elif args.kind == "onnx-pair":
        paths = list(make_onnx_pair(args.out_dir, size_mb=args.size_mb, seed=args.seed))
    else:
        paths = [
            make_tflite_model(
                args.out,
                seed=args.seed,
                input_dim=args.input_dim,
                output_dim=args.output_dim,
                retrain=args.retrain,
            )
        ]
    for p_ in paths:
        print(f"{p_}\t{p_.stat().st_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
