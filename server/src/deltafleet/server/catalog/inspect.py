"""Model inspection for the catalog: what an ONNX or TFLite file is, without ever running it.

:func:`inspect_model` reads the IO signature, operator set, parameter count, size and hash of
a model file, and rejects anything that is not a valid single-file model with a one-line
:class:`CatalogError`. ONNX goes through ``onnx`` (parse + checker); TFLite through the
``tflite`` package's flatbuffer readers, with bounds checks because flatbuffers' Python readers
do not verify untrusted input.

Inputs and outputs are :class:`deltafleet.shared.TensorSpec`, with ONNX named dimensions kept
as their names; :func:`signature` turns them into the :class:`IoSignature` a manifest signs.
:func:`golden_input` is the server's numpy adapter for golden inputs (the agent's is
``serving.golden_feeds``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
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
from .inspect_torch import inspect_ptl, is_torch_archive

__all__ = ["ModelInfo", "detect_format", "golden_input", "inspect_model", "io_signature",
           "load_golden", "signature"]

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

    format: str  # "onnx" | "tflite" | "ptl"
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
        }


def _one_line(e: BaseException) -> str:
    return one_line(e, limit=200)


def _read_head(path: Path, n: int = 8) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError as e:
        raise CatalogError(f"cannot read {path}: {e.strerror or _one_line(e)}") from e


def detect_format(path: Path) -> str:
    """ "tflite", "ptl" or "onnx" by content (not by file name); CatalogError for anything else."""
    path = Path(path)
    head = _read_head(path)
    if len(head) == 8 and head[4:8] == TFLITE_FILE_IDENTIFIER:
        return "tflite"
    if is_torch_archive(head):
        return _inspect_ptl(path).format
    _load_onnx(path)
    return "onnx"


def inspect_model(path: Path) -> ModelInfo:
    """Inspect a model file; CatalogError (one line) unless it is a valid ONNX or TFLite model."""
    path = Path(path)
    head = _read_head(path)
    if not head:
        raise CatalogError(f"{path.name} is empty, not a model")
    if len(head) == 8 and head[4:8] == TFLITE_FILE_IDENTIFIER:
        return _inspect_tflite(path)
    if is_torch_archive(head):
        return _inspect_ptl(path)
    return _inspect_onnx(path)


def _inspect_ptl(path: Path) -> ModelInfo:
    """A TorchScript-lite file (``inspect_torch.inspect_ptl``)."""
    info: ModelInfo = inspect_ptl(path)
    return info


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
    return ModelInfo(
        format="onnx",
        size_bytes=size,
        sha256=sha256_file(path),
        inputs=inputs,
        outputs=outputs,
        param_count=int(params),
        ops=tuple(sorted(_onnx_ops(graph))),
        ir_version=int(model.ir_version),
        opset={(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        producer=producer,
        tflite_schema_version=None,
    )


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
    type_names = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}

    def buffer_has_data(index: int) -> bool:
        if index <= 0:
            return False
        if index >= n_buffers:
            raise CatalogError(f"{path.name} is a corrupt TFLite model: buffer {index} missing")
        buf = model.Buffers(index)
        return bool(buf.DataLength() or buf.Size())

    ops: set[str] = set()
    params = 0
    main: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None = None
    for s in range(n_subgraphs):
        sg = model.Subgraphs(s)
        n_tensors = bounds.count(sg.TensorsLength(), "tensor")
        for o in range(bounds.count(sg.OperatorsLength(), "operator")):
            index = sg.Operators(o).OpcodeIndex()
            if index >= n_opcodes:
                raise CatalogError(
                    f"{path.name} is a corrupt TFLite model: operator code {index} missing"
                )
            ops.add(opcode_names[index])
        for t in range(n_tensors):
            tensor = sg.Tensors(t)
            if buffer_has_data(tensor.Buffer()):
                params += math.prod(int(d) for d in _int_vector(tensor, "Shape", bounds))

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
    )


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
