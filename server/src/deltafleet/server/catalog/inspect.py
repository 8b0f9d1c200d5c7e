"""Model inspection for the catalog: what a model file is, without ever running it.

:func:`inspect_model` reads the IO signature, operator set (and which runtimes at which
versions load it, ``compat``), parameter count, size, hash, precision and quantization scheme
and an inference-memory estimate of a model file, and rejects anything that is not a valid
single-file model with a one-line :class:`CatalogError`. ONNX goes through ``onnx`` (parse +
checker + shape inference); TFLite through the ``tflite`` package's flatbuffer readers, with
bounds checks because flatbuffers' Python readers do not verify untrusted input.

Formats are a registry keyed by format name (:func:`register_inspector`): TFLite is sniffed by
its file identifier, ONNX (protobuf has no magic) is the fallback. Another format is one
module in ``catalog/formats/`` that calls ``register_inspector`` when imported; every module
there is imported the first time a file is inspected.

Memory estimate (``ModelInfo.memory``): the weights' bytes plus the largest working set of
one operator at batch 1 (the bytes of its non-constant inputs and its outputs, with every
dynamic dimension taken as 1). Runtimes add their arena overhead and may keep more tensors
alive, so it is a floor to compare variants by, not a promise.

Inputs and outputs are :class:`deltafleet.shared.TensorSpec`, with ONNX named dimensions kept
as their names; :func:`signature` turns them into the :class:`IoSignature` a manifest signs.
:func:`golden_input` is the server's numpy adapter for golden inputs (the agent's is
``serving.golden_feeds``).
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltafleet.shared import (
    SIGNABLE_DTYPES,
    GoldenInput,
    GoldenTensor,
    IoSignature,
    TensorSpec,
    WireError,
    one_line,
    sha256_file,
)

from ..errors import CatalogError
from .compat import onnx_runtimes, tflite_runtimes

__all__ = ["Inspector", "ModelInfo", "detect_format", "golden_input", "inspect_model",
           "inspectors", "io_signature", "load_golden", "register_inspector", "signature"]

TFLITE_FILE_IDENTIFIER = b"TFL3"
# onnx.checker's full_check (strict shape inference) on models up to this size; larger models
# get the structural check only.
FULL_CHECK_MAX_BYTES = 256 * 1024 * 1024
_ONNX_DEFAULT_DOMAINS = ("", "ai.onnx")

_TFLITE_DTYPES = {
    "FLOAT32": "float32",
    "FLOAT16": "float16",
    "FLOAT64": "float64",
    "INT4": "int4",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "BOOL": "bool",
    "STRING": "string",
    "COMPLEX64": "complex64",
    "COMPLEX128": "complex128",
    "BFLOAT16": "bfloat16",
    "RESOURCE": "resource",
    "VARIANT": "variant",
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the catalog knows about one model file."""

    format: str  # "onnx" | "tflite"
    size_bytes: int
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    param_count: int
    ops: tuple[str, ...]  # sorted unique ONNX op types ("domain.Op" off the default domain)
    ir_version: int | None  # ONNX only
    opset: dict[str, int] | None  # ONNX only: domain ("ai.onnx" for the default) -> version
    producer: str | None  # ONNX producer name + version; TFLite description
    tflite_schema_version: int | None  # TFLite only
    precision: str = "fp32"  # fp32 | fp16 | int8 | other: what most weight bytes are
    # scheme: none | float16 | dynamic | static-qdq | static-qoperator | weight-only |
    # full-integer | dynamic-range; plus weight/activation dtypes and per-channel
    quantization: dict[str, Any] = field(default_factory=lambda: {"scheme": "none"})
    op_versions: dict[str, int] | None = None  # TFLite: builtin op -> highest version used
    runtimes: tuple[dict[str, Any], ...] = ()  # compat: runtime, min_version, why
    memory: dict[str, Any] = field(default_factory=dict)  # see the module docstring

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "param_count": self.param_count,
            "ops": list(self.ops),
            "ir_version": self.ir_version,
            "opset": dict(self.opset) if self.opset is not None else None,
            "producer": self.producer,
            "tflite_schema_version": self.tflite_schema_version,
            "precision": self.precision,
            "quantization": dict(self.quantization),
            "op_versions": dict(self.op_versions) if self.op_versions is not None else None,
            "runtimes": [dict(r) for r in self.runtimes],
            "memory": dict(self.memory),
        }


def _one_line(e: BaseException) -> str:
    return one_line(e, limit=200)


def _read_head(path: Path, n: int = 8) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError as e:
        raise CatalogError(f"cannot read {path}: {e.strerror or _one_line(e)}") from e


@dataclass(frozen=True, slots=True)
class Inspector:
    """One model format: ``sniff`` tells it by the file's first 64 bytes, ``inspect`` reads
    it (CatalogError, one line, for a file of the format that is not a valid model). The
    ``fallback`` format (ONNX: protobuf has no magic) takes what no other sniff claims;
    ``probe`` checks such a file really is one, for ``detect_format``."""

    format: str
    sniff: Callable[[bytes], bool]
    inspect: Callable[[Path], ModelInfo]
    fallback: bool = False
    probe: Callable[[Path], object] | None = None


_INSPECTORS: dict[str, Inspector] = {}
_DISCOVERED = False


def register_inspector(inspector: Inspector) -> None:
    """Add (or replace) the inspector of ``inspector.format``."""
    _INSPECTORS[inspector.format] = inspector


def inspectors() -> dict[str, Inspector]:
    """Every registered format, after importing the modules in ``catalog/formats/``."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        from . import formats

        for mod in pkgutil.iter_modules(formats.__path__):
            importlib.import_module(f"{formats.__name__}.{mod.name}")
    return dict(_INSPECTORS)


def _inspector_for(path: Path) -> Inspector:
    head = _read_head(path, 64)
    if not head:
        raise CatalogError(f"{path.name} is empty, not a model")
    registry = inspectors()
    for inspector in registry.values():
        if not inspector.fallback and inspector.sniff(head):
            return inspector
    fallback = [i for i in registry.values() if i.fallback]
    return fallback[0]


def detect_format(path: Path) -> str:
    """The format of a model file by content (not by file name), e.g. "tflite" or "onnx";
    CatalogError for anything else."""
    path = Path(path)
    inspector = _inspector_for(path)
    if inspector.probe is not None:
        inspector.probe(path)
    return inspector.format


def inspect_model(path: Path) -> ModelInfo:
    """Inspect a model file; CatalogError (one line) unless it is a valid model of a
    registered format."""
    path = Path(path)
    return _inspector_for(path).inspect(path)


def _dtype_bytes(dtype: str) -> float:
    if dtype in ("int4", "uint4"):
        return 0.5
    if dtype in ("bool", "string"):
        return 1
    try:
        import numpy as np

        return float(np.dtype(dtype).itemsize)
    except TypeError:
        return {"bfloat16": 2.0}.get(dtype, 4.0)


def _nbytes(dtype: str, shape: tuple[Any, ...] | list[Any]) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) and d > 0 else 1
    return int(n * _dtype_bytes(dtype))


def _memory(weights_bytes: int, working_set_bytes: int, op: str | None) -> dict[str, Any]:
    return {
        "weights_bytes": int(weights_bytes),
        "largest_op_working_set_bytes": int(working_set_bytes),
        "largest_op": op,
        "estimate_bytes": int(weights_bytes + working_set_bytes),
        "method": "weights + the largest one-operator working set (activation inputs + "
                  "outputs) at batch 1; a floor: runtimes add arena overhead",
    }


def _precision(weight_bytes_by_dtype: dict[str, int], scheme: str) -> str:
    if scheme in ("dynamic", "static-qdq", "static-qoperator", "weight-only", "full-integer",
                  "dynamic-range"):
        return "int8"
    floats = {k: v for k, v in weight_bytes_by_dtype.items() if k.startswith(("float", "bfloat"))}
    if not floats:
        return "fp32"
    top = max(floats, key=lambda k: floats[k])
    return {"float32": "fp32", "float16": "fp16"}.get(top, top)


# --------------------------------------------------------------------------------------- ONNX


def _load_onnx(path: Path) -> Any:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(path), format="protobuf", load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise CatalogError(
            f"{path.name} is neither a TFLite nor a readable ONNX model: {_one_line(e)}"
        ) from e
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise CatalogError(f"{path.name} is neither a TFLite nor an ONNX model")
    return model


def _inspect_onnx(path: Path) -> ModelInfo:
    import onnx
    from onnx import helper

    model = _load_onnx(path)
    graph = model.graph
    for t in list(graph.initializer):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise CatalogError(
                f"{path.name} keeps tensor {t.name!r} in external data: "
                "save the model as one file (onnx.save(model, path, save_as_external_data=False))"
            )
    size = path.stat().st_size
    try:
        # The path form handles models near protobuf's 2 GiB limit.
        onnx.checker.check_model(str(path), full_check=size <= FULL_CHECK_MAX_BYTES)
    except Exception as e:  # checker raises ValidationError, InferenceError, ...
        raise CatalogError(f"{path.name} fails the ONNX checker: {_one_line(e)}") from e

    init_names = {t.name for t in graph.initializer} | {
        t.values.name for t in graph.sparse_initializer
    }
    inputs = tuple(_onnx_spec(v, helper) for v in graph.input if v.name not in init_names)
    outputs = tuple(_onnx_spec(v, helper) for v in graph.output)
    params = sum(math.prod(t.dims) for t in graph.initializer) + sum(
        math.prod(t.values.dims) for t in graph.sparse_initializer
    )
    producer = f"{model.producer_name} {model.producer_version}".strip() or None
    ops = tuple(sorted(_onnx_ops(graph)))
    opset = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    by_dtype = _onnx_weight_bytes(graph, helper)
    quant = _onnx_quantization(graph, by_dtype, helper)
    return ModelInfo(
        format="onnx",
        size_bytes=size,
        sha256=sha256_file(path),
        inputs=inputs,
        outputs=outputs,
        param_count=int(params),
        ops=ops,
        ir_version=int(model.ir_version),
        opset=opset,
        producer=producer,
        tflite_schema_version=None,
        precision=_precision(by_dtype, quant["scheme"]),
        quantization=quant,
        runtimes=tuple(onnx_runtimes(opset, int(model.ir_version), ops)),
        memory=_onnx_memory(model, sum(by_dtype.values()), helper),
    )


_ONNX_QOPERATOR = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul",
                   "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
                   "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean",
                   "QLinearWhere", "QAttention"}
_ONNX_DYNAMIC = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat"}


def _elem_dtype(elem_type: int, helper: Any) -> str:
    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError, TypeError):
        return str(helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower())


def _onnx_weight_bytes(graph: Any, helper: Any) -> dict[str, int]:
    """Initializer bytes by dtype (main graph; sparse initializers by their values)."""
    out: dict[str, int] = {}
    for t in graph.initializer:
        dtype = _elem_dtype(t.data_type, helper)
        out[dtype] = out.get(dtype, 0) + _nbytes(dtype, tuple(t.dims))
    for st in graph.sparse_initializer:
        dtype = _elem_dtype(st.values.data_type, helper)
        out[dtype] = out.get(dtype, 0) + _nbytes(dtype, tuple(st.values.dims))
    return out


def _onnx_quantization(graph: Any, by_dtype: dict[str, int], helper: Any) -> dict[str, Any]:
    """The quantization scheme, from the operators (ONNX Runtime's two static formats,
    QOperator and QDQ, and its dynamic ops) and the initializers' dtypes."""
    types = [n.op_type for n in graph.node]
    kinds = set(types)
    inits = {t.name: t for t in graph.initializer}
    per_channel = False
    act_dtype = None
    for node in graph.node:
        scale_names: list[str] = []
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1:
            scale_names.append(node.input[1])
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            act_dtype = _elem_dtype(inits[node.input[2]].data_type, helper)
        if node.op_type in ("QLinearConv", "QLinearMatMul") and len(node.input) > 4:
            scale_names.append(node.input[4])
        for name in scale_names:
            t = inits.get(name)
            if t is not None and math.prod(t.dims) > 1:
                per_channel = True
    if kinds & _ONNX_DYNAMIC:
        scheme = "dynamic"
        act_dtype = "uint8"
    elif kinds & _ONNX_QOPERATOR:
        scheme = "static-qoperator"
    elif "QuantizeLinear" in kinds and "DequantizeLinear" in kinds:
        scheme = "static-qdq"
    elif "DequantizeLinear" in kinds:
        scheme = "weight-only"
    elif by_dtype and max(by_dtype, key=lambda k: by_dtype[k]) == "float16":
        return {"scheme": "float16", "weight_dtype": "float16"}
    else:
        return {"scheme": "none"}
    int_weights = {k: v for k, v in by_dtype.items() if k in ("int8", "uint8", "int4", "uint4")}
    return {
        "scheme": scheme,
        "weight_dtype": max(int_weights, key=lambda k: int_weights[k]) if int_weights else None,
        "activation_dtype": act_dtype,
        "per_channel": per_channel,
        "quantized_ops": sum(1 for t in types if t in _ONNX_DYNAMIC | _ONNX_QOPERATOR
                             or t in ("QuantizeLinear", "DequantizeLinear")),
    }


def _onnx_memory(model: Any, weights_bytes: int, helper: Any) -> dict[str, Any]:
    """``_memory`` for an ONNX graph: shapes by onnx shape inference with every dynamic
    dimension of the inputs set to 1 (batch 1)."""
    import onnx

    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    probe = _without_weight_data(model)
    for value in probe.graph.input:
        if value.type.HasField("tensor_type"):
            for d in value.type.tensor_type.shape.dim:
                if d.WhichOneof("value") != "dim_value":
                    d.dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False).graph
    except Exception:  # noqa: BLE001 - no shapes: the estimate is the weights alone
        return _memory(weights_bytes, 0, None)
    sizes: dict[str, int] = {}
    for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        if v.name in init_names or not v.type.HasField("tensor_type"):
            continue
        tt = v.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.WhichOneof("value") == "dim_value" else 1 for d in tt.shape.dim]
        sizes[v.name] = _nbytes(_elem_dtype(tt.elem_type, helper), dims)
    best, best_op = 0, None
    for node in graph.node:
        total = sum(sizes.get(n, 0) for n in node.input if n not in init_names)
        total += sum(sizes.get(n, 0) for n in node.output)
        if total > best:
            best, best_op = total, node.name or node.op_type
    return _memory(weights_bytes, best, best_op)


def _without_weight_data(model: Any) -> Any:
    """A copy of ``model`` whose large initializers keep their dims but not their data (what
    shape inference needs of them), so inference does not serialize every weight again."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:
        if math.prod(t.dims) > 1024:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.ClearField("int32_data")
            t.ClearField("int64_data")
            t.ClearField("double_data")
            t.data_location = onnx.TensorProto.DEFAULT
    return light


def _onnx_spec(value: Any, helper: Any) -> TensorSpec:
    vtype = value.type
    kind = vtype.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSpec(name=value.name, dtype=kind or "unknown", shape=())
    tt = vtype.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = helper.tensor_dtype_to_string(tt.elem_type).removeprefix("TensorProto.").lower()
    shape: list[int | str | None] = []
    for d in tt.shape.dim if tt.HasField("shape") else ():
        which = d.WhichOneof("value")
        if which == "dim_value":
            shape.append(int(d.dim_value))
        elif which == "dim_param" and d.dim_param:
            shape.append(d.dim_param)
        else:
            shape.append(None)
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(shape))


def _onnx_ops(graph: Any) -> set[str]:
    """Op types of a graph and of every subgraph (If/Loop/Scan bodies)."""
    ops: set[str] = set()
    for node in graph.node:
        domain = node.domain
        ops.add(node.op_type if domain in _ONNX_DEFAULT_DOMAINS else f"{domain}.{node.op_type}")
        for attr in node.attribute:
            if attr.HasField("g"):
                ops |= _onnx_ops(attr.g)
            for g in attr.graphs:
                ops |= _onnx_ops(g)
    return ops


# ------------------------------------------------------------------------------------- TFLite


class _Bounds:
    """Rejects flatbuffer vector lengths that cannot fit in the file (garbage / truncation)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size

    def count(self, n: int, what: str, elem_bytes: int = 4) -> int:
        if n < 0 or n * elem_bytes > self.size:
            raise CatalogError(f"{self.name} is a corrupt TFLite model: bad {what} count {n}")
        return n


def _inspect_tflite(path: Path) -> ModelInfo:
    data = path.read_bytes()
    try:
        return _parse_tflite(path, data)
    except CatalogError:
        raise
    except (
        struct.error,
        IndexError,
        ValueError,
        TypeError,
        UnicodeDecodeError,
        OverflowError,
    ) as e:
        raise CatalogError(
            f"{path.name} is a corrupt TFLite model (flatbuffer does not parse): {_one_line(e)}"
        ) from e


def _parse_tflite(path: Path, data: bytes) -> ModelInfo:
    import tflite

    bounds = _Bounds(path.name, len(data))
    if len(data) < 16:
        raise CatalogError(f"{path.name} is a truncated TFLite model ({len(data)} bytes)")
    root = struct.unpack_from("<I", data, 0)[0]
    if root + 4 > len(data):
        raise CatalogError(f"{path.name} is a truncated TFLite model (root offset out of range)")
    model = tflite.Model.GetRootAs(data, 0)
    schema_version = int(model.Version())
    n_subgraphs = bounds.count(model.SubgraphsLength(), "subgraph")
    if n_subgraphs == 0:
        raise CatalogError(f"{path.name} is a TFLite model without a subgraph")
    n_opcodes = bounds.count(model.OperatorCodesLength(), "operator code")
    n_buffers = bounds.count(model.BuffersLength(), "buffer")

    opcode_names = [_tflite_op_name(model.OperatorCodes(i), tflite) for i in range(n_opcodes)]
    opcode_versions = [int(model.OperatorCodes(i).Version() or 1) for i in range(n_opcodes)]
    type_names = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}

    def buffer_bytes(index: int) -> int:
        if index <= 0:
            return 0
        if index >= n_buffers:
            raise CatalogError(f"{path.name} is a corrupt TFLite model: buffer {index} missing")
        buf = model.Buffers(index)
        return int(buf.DataLength() or buf.Size())

    ops: set[str] = set()
    op_versions: dict[str, int] = {}
    params = 0
    weight_bytes: dict[str, int] = {}
    act_dtypes: set[str] = set()
    weight_scales: list[int] = []  # number of scales of each quantized constant tensor
    best_ws, best_op = 0, None
    main: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None = None
    for s in range(n_subgraphs):
        sg = model.Subgraphs(s)
        n_tensors = bounds.count(sg.TensorsLength(), "tensor")
        constant: list[bool] = []
        tensor_bytes: list[int] = []
        for t in range(n_tensors):
            tensor = sg.Tensors(t)
            type_name = type_names.get(tensor.Type(), f"TYPE_{tensor.Type()}")
            dtype = _TFLITE_DTYPES.get(type_name, type_name.lower())
            shape = _int_vector(tensor, "Shape", bounds)
            const_bytes = buffer_bytes(tensor.Buffer())
            constant.append(const_bytes > 0)
            tensor_bytes.append(_nbytes(dtype, shape))
            quant = tensor.Quantization()
            n_scales = int(quant.ScaleLength()) if quant is not None else 0
            if const_bytes:
                params += math.prod(int(d) for d in shape)
                weight_bytes[dtype] = weight_bytes.get(dtype, 0) + const_bytes
                if n_scales and dtype in ("int8", "uint8", "int4", "int16"):
                    weight_scales.append(n_scales)
            elif (dtype in ("int8", "uint8", "int16") and n_scales) or dtype.startswith("float"):
                act_dtypes.add(dtype)
        for o in range(bounds.count(sg.OperatorsLength(), "operator")):
            op = sg.Operators(o)
            index = op.OpcodeIndex()
            if index >= n_opcodes:
                raise CatalogError(
                    f"{path.name} is a corrupt TFLite model: operator code {index} missing"
                )
            name = opcode_names[index]
            ops.add(name)
            op_versions[name] = max(op_versions.get(name, 0), opcode_versions[index])
            ws = 0
            for field_name in ("Inputs", "Outputs"):
                for i in range(bounds.count(getattr(op, f"{field_name}Length")(), field_name)):
                    t = int(getattr(op, field_name)(i))
                    if 0 <= t < n_tensors and not constant[t]:
                        ws += tensor_bytes[t]
            if ws > best_ws:
                best_ws, best_op = ws, name

        def spec(t: int, sg: Any = sg, n_tensors: int = n_tensors) -> TensorSpec:
            if not 0 <= t < n_tensors:
                raise CatalogError(f"{path.name} is a corrupt TFLite model: tensor {t} missing")
            tensor = sg.Tensors(t)
            dims = _int_vector(tensor, "ShapeSignature", bounds) or _int_vector(
                tensor, "Shape", bounds
            )
            type_name = type_names.get(tensor.Type(), f"TYPE_{tensor.Type()}")
            return TensorSpec(
                name=(tensor.Name() or b"").decode("utf-8"),
                dtype=_TFLITE_DTYPES.get(type_name, type_name.lower()),
                shape=tuple(int(d) if d >= 0 else None for d in dims),
            )

        if s == 0:
            n_in = bounds.count(sg.InputsLength(), "input")
            n_out = bounds.count(sg.OutputsLength(), "output")
            main = (
                tuple(spec(int(sg.Inputs(i))) for i in range(n_in)),
                tuple(spec(int(sg.Outputs(i))) for i in range(n_out)),
            )
    assert main is not None
    description = model.Description()
    quant = _tflite_quantization(weight_bytes, act_dtypes, weight_scales, ops, main[0])
    return ModelInfo(
        format="tflite",
        size_bytes=len(data),
        sha256=sha256_file(path),
        inputs=main[0],
        outputs=main[1],
        param_count=int(params),
        ops=tuple(sorted(ops)),
        ir_version=None,
        opset=None,
        producer=description.decode("utf-8", "replace") if description else None,
        tflite_schema_version=schema_version,
        precision=_precision(weight_bytes, quant["scheme"]),
        quantization=quant,
        op_versions=op_versions,
        runtimes=tuple(tflite_runtimes(op_versions, _tflite_min_runtime(model, bounds))),
        memory=_memory(sum(weight_bytes.values()), best_ws, best_op),
    )


def _tflite_quantization(weight_bytes: dict[str, int], act_dtypes: set[str],
                         weight_scales: list[int], ops: set[str],
                         inputs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    """full-integer (integer activations), dynamic-range (int8 weights, float activations)
    or float16 (fp16 weights dequantized at load), from the tensors' types."""
    int_weights = {k: v for k, v in weight_bytes.items() if k in ("int8", "uint8", "int4")}
    floats = {k: v for k, v in weight_bytes.items() if k.startswith("float")}
    if int_weights and sum(int_weights.values()) >= sum(floats.values()):
        integer_acts = sorted(a for a in act_dtypes if not a.startswith("float"))
        scheme = "full-integer" if integer_acts else "dynamic-range"
        io = sorted({t.dtype for t in inputs})
        return {"scheme": scheme,
                "weight_dtype": max(int_weights, key=lambda k: int_weights[k]),
                "activation_dtype": integer_acts[0] if integer_acts else "float32",
                "io_dtypes": io,
                "per_channel": any(n > 1 for n in weight_scales)}
    if floats and max(floats, key=lambda k: floats[k]) == "float16" and "DEQUANTIZE" in ops:
        return {"scheme": "float16", "weight_dtype": "float16"}
    return {"scheme": "none"}


def _tflite_min_runtime(model: Any, bounds: _Bounds) -> str | None:
    """The converter's ``min_runtime_version`` metadata, when the model has it."""
    n_meta = bounds.count(model.MetadataLength(), "metadata")
    for i in range(n_meta):
        meta = model.Metadata(i)
        if meta.Name() == b"min_runtime_version":
            index = int(meta.Buffer())
            if 0 < index < model.BuffersLength():
                raw = model.Buffers(index).DataAsNumpy()
                if not isinstance(raw, int):
                    text = bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")
                    return text or None
    return None


def _int_vector(table: Any, field: str, bounds: _Bounds) -> list[int]:
    n = bounds.count(getattr(table, f"{field}Length")(), field)
    getter = getattr(table, field)
    return [int(getter(i)) for i in range(n)]


def _tflite_op_name(opcode: Any, tflite: Any) -> str:
    # Schema rule: the real code is the larger of builtin_code and deprecated_builtin_code
    # (the latter is capped at 127 = PLACEHOLDER_FOR_GREATER_OP_CODES).
    code = max(int(opcode.BuiltinCode()), int(opcode.DeprecatedBuiltinCode()))
    if code == tflite.BuiltinOperator.CUSTOM:
        custom = opcode.CustomCode()
        return f"CUSTOM:{custom.decode('utf-8', 'replace')}" if custom else "CUSTOM"
    try:
        return str(tflite.opcode2name(code))
    except ValueError:
        return f"BUILTIN_{code}"


# ------------------------------------------------------------------ manifest IO contract

# dtypes whose names the agent's runtimes report the same way the catalog does; a model with
# any other IO type gets no signed IO signature (the agent then compares with the running model)
GOLDEN_MAX_FILES = 8
GOLDEN_MAX_BYTES = 256 * 1024  # all golden inputs of a variant, before base64 (manifest cap 6 MiB)


def signature(info: dict[str, Any] | None) -> IoSignature | None:
    """The IO contract a manifest signs, from a variant's catalog info (``ModelInfo.to_json``):
    names, numpy dtypes and shapes with every dynamic dimension as None, exactly as the agent's
    runtime adapters report them. None when the info has no IO or an IO type the agent names
    differently."""
    if not info or "inputs" not in info or "outputs" not in info:
        return None
    parts = []
    for part in ("inputs", "outputs"):
        if any(spec.get("dtype") not in SIGNABLE_DTYPES for spec in info[part]):
            return None
        parts.append([TensorSpec(spec["name"], spec["dtype"], tuple(spec.get("shape", [])))
                      for spec in info[part]])
    return IoSignature.of(*parts)


def io_signature(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """:func:`signature` in its wire form, as variants and manifests carry it."""
    sig = signature(info)
    return None if sig is None else sig.to_wire()


def golden_input(arrays: dict[str, Any]) -> GoldenInput:
    """One golden sample from numpy arrays (C-order bytes, numpy dtype names)."""
    import numpy as np

    tensors = []
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        tensors.append(GoldenTensor(name, a.dtype.name, tuple(int(n) for n in a.shape),
                                    a.tobytes()))
    return GoldenInput(tuple(tensors))


def load_golden(paths: list[Path], inputs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    """Golden inputs for a model, one ``.npz`` per sample (one array per model input, named
    like it), in the manifest's form (:meth:`GoldenInput.to_wire`). CatalogError (one line)
    for a file that does not fit the model's inputs or the size cap."""
    import numpy as np

    if len(paths) > GOLDEN_MAX_FILES:
        raise CatalogError(f"at most {GOLDEN_MAX_FILES} golden input files per variant")
    wanted = {s.name: s for s in inputs}
    out: list[dict[str, Any]] = []
    total = 0
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: np.ascontiguousarray(npz[k]) for k in npz.files}
        except (OSError, ValueError, EOFError) as e:
            raise CatalogError(f"golden inputs {path.name}: not a readable .npz ({_one_line(e)})") from e
        if set(arrays) != set(wanted):
            raise CatalogError(f"golden inputs {path.name}: arrays {sorted(arrays)} do not match "
                               f"the model inputs {sorted(wanted)}")
        for name, arr in arrays.items():
            spec = wanted[name]
            if arr.dtype.name != spec.dtype:
                raise CatalogError(f"golden inputs {path.name}: {name!r} is {arr.dtype.name}, "
                                   f"the model wants {spec.dtype}")
            if len(arr.shape) != len(spec.shape) or any(
                    isinstance(d, int) and d >= 0 and d != n for d, n in zip(spec.shape, arr.shape,
                                                                            strict=True)):
                raise CatalogError(f"golden inputs {path.name}: {name!r} has shape "
                                   f"{list(arr.shape)}, the model wants {list(spec.shape)}")
        sample = golden_input(arrays)
        try:
            GoldenInput.from_wire(sample.to_wire())
        except WireError as e:
            raise CatalogError(f"golden inputs {path.name}: {e}") from e
        total += sample.nbytes
        out.append(sample.to_wire())
    if total > GOLDEN_MAX_BYTES:
        raise CatalogError(f"golden inputs are {total} bytes, over the {GOLDEN_MAX_BYTES}-byte "
                           "cap (they travel in every manifest)")
    return out


register_inspector(Inspector(
    "tflite", lambda head: len(head) >= 8 and head[4:8] == TFLITE_FILE_IDENTIFIER,
    lambda path: _inspect_tflite(path)))
register_inspector(Inspector("onnx", lambda head: True, lambda path: _inspect_onnx(path),
                             fallback=True, probe=lambda path: _load_onnx(path)))
