"""What a PyTorch Mobile (TorchScript-lite, ``.ptl``) file is, read without torch and without
running any of its code.

A ``.ptl`` file is a zip archive (``<root>/bytecode.pkl``, ``data.pkl``, ``constants.pkl``,
``data/<key>`` tensor storages, ``extra/<name>``). :func:`inspect_torch` reads:

- the lite-interpreter bytecode version (``bytecode.pkl``'s first item: which torch runtimes
  can load the file) and the operators each method calls (``aten::linear``, ``aten::softmax.int``:
  the names ``torch.jit.mobile._export_operator_list`` gives);
- every stored tensor's storage (the persistent ids of ``data.pkl`` and ``constants.pkl``):
  parameter count, weight bytes by dtype, and the precision the weights are in;
- the IO contract from ``extra/deltafleet_io.json`` (the agent's ``runtime_torch`` format),
  else only the input names of ``forward``'s schema (TorchScript declares no dtypes or shapes).

The pickles are read with an unpickler that resolves no global at all (every class is a
stand-in), so a hostile file cannot run code here; member sizes are bounded before reading.
Anything that is not a lite-interpreter archive raises a one-line :class:`CatalogError`.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltafleet.shared import TensorSpec, WireError, one_line, sha256_file

from ..errors import CatalogError

__all__ = ["IO_EXTRA_FILE", "TorchModelInfo", "inspect_ptl", "inspect_torch", "is_torch_archive"]

IO_EXTRA_FILE = "deltafleet_io.json"  # the agent's runtime_torch.IO_EXTRA_FILE
MAX_PICKLE_BYTES = 64 * 1024 * 1024
MAX_MEMBERS = 100_000
ZIP_MAGIC = b"PK\x03\x04"

# storage class -> (dtype name, bytes per element)
_STORAGE_DTYPES = {
    "FloatStorage": ("float32", 4), "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2), "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8), "IntStorage": ("int32", 4), "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1), "BoolStorage": ("bool", 1),
    "QInt8Storage": ("qint8", 1), "QUInt8Storage": ("quint8", 1), "QInt32Storage": ("qint32", 4),
    "QUInt4x2Storage": ("quint4x2", 1),
    "ComplexFloatStorage": ("complex64", 8), "ComplexDoubleStorage": ("complex128", 16),
}
_WEIGHT_DTYPES = {"float32", "float64", "float16", "bfloat16", "qint8", "quint8", "qint32",
                  "quint4x2"}
_PRECISION = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16",
              "qint8": "int8", "quint8": "int8", "quint4x2": "int4", "qint32": "int32"}


@dataclass(frozen=True, slots=True)
class TorchModelInfo:
    """What the catalog learns from a ``.ptl`` file."""

    format: str  # "ptl"
    size_bytes: int
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # empty when the file declares no IO contract
    io_declared: bool  # inputs/outputs come from extra/deltafleet_io.json (else: names only)
    param_count: int  # elements of every stored floating-point or quantized tensor
    weight_bytes: int  # bytes of every stored tensor (an estimate of its resident weights)
    bytes_by_dtype: dict[str, int]
    precision: str | None  # of the weights holding most bytes: "fp32", "fp16", "int8", ...
    bytecode_version: int
    ops: tuple[str, ...]  # sorted unique operators, as torch's _export_operator_list names them
    methods: tuple[str, ...]  # methods in the bytecode ("forward", ...)
    extra_files: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "size_bytes": self.size_bytes, "sha256": self.sha256,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "io_declared": self.io_declared, "param_count": self.param_count,
            "weight_bytes": self.weight_bytes, "bytes_by_dtype": dict(self.bytes_by_dtype),
            "precision": self.precision, "bytecode_version": self.bytecode_version,
            "ops": list(self.ops), "methods": list(self.methods),
            "extra_files": list(self.extra_files),
        }


def is_torch_archive(head: bytes) -> bool:
    """Whether the first bytes of a file can start a ``.ptl`` (a zip archive)."""
    return head[:4] == ZIP_MAGIC


def inspect_ptl(path: Path) -> Any:
    """A ``.ptl`` file as the catalog's ``inspect.ModelInfo`` (the catalog's inspector for
    format "ptl"); refused when it declares no IO contract, since no agent could feed it.
    Fills the ModelInfo fields this catalog version has (precision, quantization, runtimes,
    memory where present)."""
    import dataclasses

    from .inspect import ModelInfo

    info = inspect_torch(path)
    if not info.io_declared:
        raise CatalogError(f"{Path(path).name} declares no inputs/outputs: save it with "
                           f"_extra_files={{'{IO_EXTRA_FILE}': ...}} (see docs/agent.md)")
    quantized = any(d.startswith(("qint", "quint")) for d in info.bytes_by_dtype)
    io_bytes = sum(_batch1_bytes(t) for t in (*info.inputs, *info.outputs))
    extra: dict[str, Any] = {
        "precision": info.precision or "fp32",
        "quantization": {"scheme": "static" if quantized else "none",
                         "weight_dtypes": sorted(info.bytes_by_dtype)},
        "runtimes": ({"runtime": "torch", "format": "ptl", "min_version": None,
                      "why": f"TorchScript lite bytecode v{info.bytecode_version}: torch's "
                             "lite interpreter reads bytecode up to its own version"},),
        "memory": {"weights_bytes": info.weight_bytes, "largest_op_working_set_bytes": io_bytes,
                   "largest_op": "model inputs + outputs",
                   "estimate_bytes": info.weight_bytes + io_bytes,
                   "method": "stored tensor bytes + the model's inputs and outputs at batch 1 "
                             "(TorchScript bytecode gives no intermediate shapes); a floor: "
                             "torch's runtime and activations come on top"},
    }
    known = {f.name for f in dataclasses.fields(ModelInfo)}
    return ModelInfo(format="ptl", size_bytes=info.size_bytes, sha256=info.sha256,
                     inputs=info.inputs, outputs=info.outputs, param_count=info.param_count,
                     ops=info.ops, ir_version=None, opset=None,
                     producer=f"TorchScript lite bytecode v{info.bytecode_version}",
                     tflite_schema_version=None,
                     **{k: v for k, v in extra.items() if k in known})


def _batch1_bytes(spec: TensorSpec) -> int:
    width = next((w for d, w in _STORAGE_DTYPES.values() if d == spec.dtype), 4)
    return width * math.prod(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)


def inspect_torch(path: Path) -> TorchModelInfo:
    """Inspect a TorchScript-lite file; CatalogError (one line) unless it is one."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            return _inspect(path, z)
    except (zipfile.BadZipFile, EOFError) as e:
        raise CatalogError(f"{path.name} is not a TorchScript-lite (.ptl) file: "
                           f"{_one_line(e)}") from e
    except OSError as e:
        raise CatalogError(f"cannot read {path}: {e.strerror or _one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    return one_line(e, limit=200)


def _inspect(path: Path, z: zipfile.ZipFile) -> TorchModelInfo:
    members = z.infolist()
    if len(members) > MAX_MEMBERS:
        raise CatalogError(f"{path.name} has {len(members)} archive members: not a model")
    roots = {m.filename.split("/", 1)[0] for m in members if "/" in m.filename}
    by_name = {m.filename: m for m in members}
    root = next((r for r in sorted(roots) if f"{r}/bytecode.pkl" in by_name), None)
    if root is None:
        if any(n.endswith("/data.pkl") for n in by_name):
            raise CatalogError(f"{path.name} is TorchScript saved for full torch, not the lite "
                               "interpreter: save it with module._save_for_lite_interpreter()")
        raise CatalogError(f"{path.name} is a zip archive but not a TorchScript-lite (.ptl) file")

    def read(name: str, required: bool = True) -> bytes | None:
        info = by_name.get(f"{root}/{name}")
        if info is None:
            if required:
                raise CatalogError(f"{path.name} has no {name}: not a complete .ptl file")
            return None
        if info.file_size > MAX_PICKLE_BYTES:
            raise CatalogError(f"{path.name}: {name} is larger than "
                               f"{MAX_PICKLE_BYTES // (1024 * 1024)} MiB")
        return z.read(info)

    bytecode = _unpickle(path, "bytecode.pkl", read("bytecode.pkl") or b"")
    version, methods, ops, schema_inputs = _bytecode(path, bytecode)
    storages: dict[tuple[str, str], tuple[str, int]] = {}
    for name in ("data.pkl", "constants.pkl"):
        raw = read(name, required=name == "data.pkl")
        if raw is not None:
            pids: list[Any] = []
            _unpickle(path, name, raw, pids)
            for pid in pids:
                key, dtype, numel = _storage(path, pid)
                storages[(name, key)] = (dtype, numel)
    bytes_by_dtype: dict[str, int] = {}
    params = 0
    for dtype, numel in storages.values():
        width = next((w for d, w in _STORAGE_DTYPES.values() if d == dtype), 1)
        bytes_by_dtype[dtype] = bytes_by_dtype.get(dtype, 0) + numel * width
        if dtype in _WEIGHT_DTYPES:
            params += numel
    weights = {d: b for d, b in bytes_by_dtype.items() if d in _WEIGHT_DTYPES}
    precision = _PRECISION.get(max(weights, key=lambda d: weights[d])) if weights else None

    extra = tuple(sorted(n[len(f"{root}/extra/"):] for n in by_name
                         if n.startswith(f"{root}/extra/") and not n.endswith("/")))
    io_raw = read(f"extra/{IO_EXTRA_FILE}", required=False)
    if io_raw is not None:
        inputs, outputs = _io_spec(path, io_raw)
        declared = True
    else:
        inputs = tuple(TensorSpec(n, "Tensor", ()) for n in schema_inputs)
        outputs, declared = (), False
    return TorchModelInfo(
        format="ptl", size_bytes=path.stat().st_size, sha256=sha256_file(path),
        inputs=inputs, outputs=outputs, io_declared=declared, param_count=params,
        weight_bytes=sum(bytes_by_dtype.values()), bytes_by_dtype=bytes_by_dtype,
        precision=precision, bytecode_version=version, ops=tuple(sorted(ops)),
        methods=tuple(methods), extra_files=extra)


# ----------------------------------------------------------------------------- pickles


class _Stub:
    """Stands in for every class a TorchScript pickle names; records what it was given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Unpickler(pickle.Unpickler):
    """Resolves no global: a hostile pickle can build stand-ins, never call real code."""

    def __init__(self, data: bytes, pids: list[Any] | None) -> None:
        super().__init__(io.BytesIO(data))
        self._pids = pids
        self._types: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in self._types:
            self._types[key] = type(name, (_Stub,), {"qualname": f"{module}.{name}"})
        return self._types[key]

    def persistent_load(self, pid: Any) -> Any:
        if self._pids is None:
            raise pickle.UnpicklingError("unexpected tensor storage")
        self._pids.append(pid)
        return _Stub(pid)


def _unpickle(path: Path, name: str, data: bytes, pids: list[Any] | None = None) -> Any:
    try:
        return _Unpickler(data, pids).load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... on a damaged pickle
        raise CatalogError(f"{path.name}: {name} does not unpickle: {_one_line(e)}") from e


def _storage(path: Path, pid: Any) -> tuple[str, str, int]:
    """(key, dtype, element count) of a ``('storage', <Storage class>, key, location, numel)``."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
        raise CatalogError(f"{path.name} has a tensor storage record this reader does not know")
    cls_name = getattr(pid[1], "__name__", str(pid[1]))
    dtype = _STORAGE_DTYPES.get(cls_name, (cls_name, 1))[0]
    return pid[2], dtype, pid[4]


def _bytecode(path: Path, bc: Any) -> tuple[int, list[str], set[str], list[str]]:
    """(bytecode version, method names, operator names, forward's input names)."""
    if not (isinstance(bc, tuple) and bc and isinstance(bc[0], int)):
        raise CatalogError(f"{path.name}: bytecode.pkl does not start with a version")
    methods: list[str] = []
    ops: set[str] = set()
    inputs: list[str] = []
    for entry in bc[1:]:
        if not (isinstance(entry, tuple) and len(entry) >= 2 and isinstance(entry[0], str)):
            raise CatalogError(f"{path.name}: bytecode.pkl has a method this reader does not know")
        qualified = entry[0]
        short = qualified.rsplit(".", 1)[-1]
        methods.append(short)
        table = _pairs(entry[1])
        for op in table.get("operators", ()):
            if isinstance(op, tuple) and len(op) >= 2 and isinstance(op[0], str):
                ops.add(f"{op[0]}.{op[1]}" if op[1] else op[0])
        if short == "forward" and len(entry) >= 3:
            args = _pairs(entry[2]).get("arguments", ())
            names = [_pairs(a).get("name") for a in args if isinstance(a, tuple)]
            inputs = [n for n in names[1:] if isinstance(n, str)]  # after self
    return bc[0], methods, ops, inputs


def _pairs(t: Any) -> Mapping[str, Any]:
    """A pickled tuple of (key, value) pairs as a dict; {} for anything else."""
    if not isinstance(t, tuple):
        return {}
    return {p[0]: p[1] for p in t if isinstance(p, tuple) and len(p) == 2
            and isinstance(p[0], str)}


def _io_spec(path: Path, raw: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise WireError("expected an object with version 1")
        parts = []
        for part in ("inputs", "outputs"):
            specs = doc.get(part)
            if not isinstance(specs, list) or not specs:
                raise WireError(f"{part} must be a non-empty list")
            parts.append(tuple(TensorSpec.from_wire(s) for s in specs))
    except (ValueError, WireError) as e:
        raise CatalogError(f"{path.name}: extra/{IO_EXTRA_FILE} is invalid: {_one_line(e)}") from e
    return parts[0], parts[1]
