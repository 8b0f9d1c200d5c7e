"""Inference runtime adapters: ONNX Runtime, LiteRT / tflite-runtime and PyTorch Mobile
(``runtime_torch``) behind one interface.

Runtimes are optional extras of the agent, so every runtime module is imported lazily, inside
the adapter that needs it: ``import deltafleet.agent.runtime`` works on a device that has none
of them. Every failure of a runtime (missing package, corrupt model, bad feed, non-finite
output) surfaces as a one-line :class:`ModelRuntimeError`; the foreign exception is chained.

Runtime names used throughout the agent (device profile, ``prefer=``):
``onnxruntime`` (format ``onnx``), ``litert`` and ``tflite-runtime`` (format ``tflite``),
``torch`` (format ``ptl``: TorchScript-lite in torch's lite interpreter).

A model's inputs and outputs are :class:`deltafleet.shared.TensorSpec` with numpy dtype names
and every dynamic dimension as None, so ``LoadedModel.signature`` compares directly with the
signature a manifest signs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from deltafleet.shared import IoSignature, TensorSpec
from deltafleet.shared.errors import one_line as _one_line

from .errors import ModelRuntimeError

__all__ = [
    "FORMATS",
    "RUNTIMES",
    "LoadedModel",
    "OnnxRuntimeModel",
    "TFLiteModel",
    "available_runtimes",
    "load_model",
    "zero_feeds",
]

FORMATS = ("onnx", "tflite", "ptl")
# Runtime name -> (format, distributions that provide it, top-level module, extra to install).
_RUNTIME_TABLE: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "onnxruntime": (
        "onnx",
        ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
        "onnxruntime",
        "onnxruntime",
    ),
    "litert": ("tflite", ("ai-edge-litert", "ai-edge-litert-nightly"), "ai_edge_litert", "litert"),
    "tflite-runtime": ("tflite", ("tflite-runtime",), "tflite_runtime", "tflite"),
    "torch": ("ptl", ("torch",), "torch", "torch"),
}
RUNTIMES = tuple(_RUNTIME_TABLE)
# Preference order per format: the first installed runtime wins.
_PREFERENCE = {"onnx": ("onnxruntime",), "tflite": ("litert", "tflite-runtime"),
               "ptl": ("torch",)}
_INSTALL_HINT = {"onnx": "onnxruntime", "tflite": "litert", "ptl": "torch"}

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
    "tensor(complex64)": "complex64",
    "tensor(complex128)": "complex128",
}




class LoadedModel(ABC):
    """A model loaded in a runtime, ready to run. Close it (or use ``with``) to free memory."""

    format: str
    runtime: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def signature(self) -> IoSignature:
        """The IO contract this model has, as a manifest signs it."""
        return IoSignature.of(self.inputs, self.outputs)

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference: input name -> array in, output name -> array out."""

    @abstractmethod
    def close(self) -> None:
        """Release the runtime's resources; the model must not be run afterwards."""

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} via {self.runtime}>"


class OnnxRuntimeModel(LoadedModel):
    """An ONNX model in an onnxruntime InferenceSession on the CPU with one intra-op thread.

    ``InferenceSession.run`` is thread-safe, so no lock is needed here.
    """

    format = "onnx"
    runtime = "onnxruntime"

    def __init__(self, path: Path) -> None:
        ort = _import("onnxruntime", "onnx")
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only
            self._session: Any = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
            self.inputs = tuple(_ort_spec(a) for a in self._session.get_inputs())
            self.outputs = tuple(_ort_spec(a) for a in self._session.get_outputs())
        except Exception as e:
            raise ModelRuntimeError(f"onnxruntime cannot load {path.name}: {_one_line(e)}") from e
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise ModelRuntimeError("model is closed")
        try:
            results = session.run(self._output_names, feeds)
        except Exception as e:
            raise ModelRuntimeError(f"onnxruntime inference failed: {_one_line(e)}") from e
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._session = None


def _ort_spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=_ORT_TYPES.get(arg.type, str(arg.type)), shape=shape)


class TFLiteModel(LoadedModel):
    """A TFLite model in a LiteRT or tflite-runtime Interpreter (one thread).

    Interpreters are not thread-safe: ``run`` holds a lock for set-invoke-get, and resizes
    inputs (dynamic dimensions) when a feed's shape differs from the allocated one.
    """

    format = "tflite"

    def __init__(self, path: Path, runtime: str = "litert") -> None:
        if runtime not in _PREFERENCE["tflite"]:
            raise ModelRuntimeError(
                f"{runtime!r} is not a tflite runtime: use litert or tflite-runtime"
            )
        self.runtime = runtime
        module = (
            "ai_edge_litert.interpreter" if runtime == "litert" else "tflite_runtime.interpreter"
        )
        interpreter_mod = _import(module, "tflite", runtime=runtime)
        self._lock = threading.Lock()
        try:
            self._interp: Any = interpreter_mod.Interpreter(model_path=str(path), num_threads=1)
            self._interp.allocate_tensors()
            in_details = self._interp.get_input_details()
            out_details = self._interp.get_output_details()
        except Exception as e:
            raise ModelRuntimeError(
                f"{runtime} cannot load {path.name}: {_numpy_abi_hint(e) or _one_line(e)}"
            ) from e
        self._in = {d["name"]: d for d in in_details}
        self._out = [(d["name"], d["index"]) for d in out_details]
        self.inputs = tuple(_tflite_spec(d) for d in in_details)
        self.outputs = tuple(_tflite_spec(d) for d in out_details)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            interp = self._interp
            if interp is None:
                raise ModelRuntimeError("model is closed")
            missing = sorted(set(self._in) - set(feeds))
            unknown = sorted(set(feeds) - set(self._in))
            if missing or unknown:
                raise ModelRuntimeError(
                    f"{self.runtime} inference failed: missing inputs {missing}, unknown {unknown}"
                )
            try:
                resized = False
                for name, detail in self._in.items():
                    value = np.asarray(feeds[name])
                    if tuple(value.shape) != tuple(detail["shape"]):
                        interp.resize_tensor_input(detail["index"], list(value.shape))
                        resized = True
                if resized:
                    interp.allocate_tensors()
                    self._in = {d["name"]: d for d in interp.get_input_details()}
                for name, detail in self._in.items():
                    interp.set_tensor(
                        detail["index"], np.asarray(feeds[name], dtype=detail["dtype"])
                    )
                interp.invoke()
                return {name: np.array(interp.get_tensor(index)) for name, index in self._out}
            except Exception as e:
                raise ModelRuntimeError(f"{self.runtime} inference failed: {_one_line(e)}") from e

    def close(self) -> None:
        with self._lock:
            self._interp = None


def _tflite_spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(int(d) if d >= 0 else None for d in dims)
    return TensorSpec(name=str(detail["name"]), dtype=np.dtype(detail["dtype"]).name, shape=shape)


def _numpy_abi_hint(e: BaseException) -> str | None:
    """tflite-runtime wheels are built against NumPy 1.x and fail opaquely under NumPy 2."""
    chain: BaseException | None = e
    while chain is not None:
        if "_ARRAY_API" in str(chain) or "numpy.core.multiarray failed" in str(chain):
            return (
                f"this build needs NumPy 1.x but NumPy {np.__version__} is installed: "
                "install 'numpy<2' or use LiteRT (pip install deltafleet-agent[litert])"
            )
        chain = chain.__cause__ or chain.__context__
    return None


def _import(module: str, fmt: str, runtime: str | None = None) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.partition(".")[0]
        if importlib.util.find_spec(top) is not None:
            raise ModelRuntimeError(
                f"{top} is installed but cannot be imported: {_numpy_abi_hint(e) or _one_line(e)}"
            ) from e
        extra = _RUNTIME_TABLE[runtime][3] if runtime else _INSTALL_HINT[fmt]
        who = f"{runtime} " if runtime else ""
        raise ModelRuntimeError(
            f"no {who}runtime for {fmt} installed: pip install deltafleet-agent[{extra}]"
        ) from e


def available_runtimes() -> dict[str, str]:
    """Installed runtimes by name with their distribution version, without importing them."""
    found: dict[str, str] = {}
    for name, (_fmt, dists, top_module, _extra) in _RUNTIME_TABLE.items():
        if importlib.util.find_spec(top_module) is None:
            continue
        for dist in dists:
            try:
                found[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def load_model(path: Path, fmt: str, *, prefer: str | None = None) -> LoadedModel:
    """Load ``path`` as ``fmt`` ("onnx", "tflite" or "ptl") in the first installed runtime
    for it.

    ``prefer`` names one runtime to use instead of the default order (LiteRT before
    tflite-runtime); it is then required, not a hint.
    """
    path = Path(path)
    if fmt not in _PREFERENCE:
        raise ModelRuntimeError(
            f"unknown model format {fmt!r}: expected one of {', '.join(FORMATS)}"
        )
    if prefer is not None and prefer not in _PREFERENCE[fmt]:
        raise ModelRuntimeError(
            f"runtime {prefer!r} cannot run {fmt} models: use one of {', '.join(_PREFERENCE[fmt])}"
        )
    if not path.is_file():
        raise ModelRuntimeError(f"model file {path} does not exist")
    if fmt == "onnx":
        return OnnxRuntimeModel(path)
    if fmt == "ptl":
        from .runtime_torch import TorchLiteModel

        return TorchLiteModel(path)
    if prefer is not None:
        return TFLiteModel(path, prefer)
    for runtime in _PREFERENCE["tflite"]:
        if importlib.util.find_spec(_RUNTIME_TABLE[runtime][2]) is not None:
            return TFLiteModel(path, runtime)
    raise ModelRuntimeError(
        f"no runtime for tflite installed: pip install deltafleet-agent[{_INSTALL_HINT['tflite']}]"
    )


def zero_feeds(model: LoadedModel) -> dict[str, np.ndarray]:
    """All-zero inputs of each declared shape and dtype; dynamic dimensions become 1."""
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        try:
            dtype = np.dtype(spec.dtype)
        except TypeError as e:
            raise ModelRuntimeError(
                f"input {spec.name!r} has type {spec.dtype} that cannot be fed from numpy"
            ) from e
        shape = tuple(1 if d is None else d for d in spec.shape)
        feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds
