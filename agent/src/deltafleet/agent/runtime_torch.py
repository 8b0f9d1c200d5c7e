"""PyTorch Mobile adapter: TorchScript-lite (``.ptl``) models in torch's lite interpreter.

Format ``ptl``, runtime ``torch`` (the ``deltafleet-agent[torch]`` extra). torch is imported
only when a ``.ptl`` model is loaded, so ``import deltafleet.agent`` never pulls it in.

A TorchScript module carries no tensor types or shapes ("Tensor" is all its schema says), so
a ``.ptl`` file states its IO contract itself: an extra file ``deltafleet_io.json`` written at
export (``_extra_files=io_extra_files(inputs, outputs)``), read here with ``zipfile`` before
torch is touched::

    {"version": 1, "inputs": [{"name": "input", "dtype": "float32", "shape": [null, 64]}],
     "outputs": [{"name": "probs", "dtype": "float32", "shape": [null, 10]}]}

``forward`` takes the inputs positionally in that order and returns one tensor, a tuple/list
of tensors (in output order) or a dict of them by output name. A file without the extra file
is refused with one line that says how to add it.

torch deprecates the lite interpreter in favour of ExecuTorch (a DeprecationWarning on every
load, silenced here); it still loads and runs in torch 2.13.
"""

from __future__ import annotations

import contextlib
import json
import threading
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deltafleet.shared import TensorSpec, WireError
from deltafleet.shared.errors import one_line as _one_line

from .errors import ModelRuntimeError
from .runtime import LoadedModel, _import

__all__ = ["IO_EXTRA_FILE", "TorchLiteModel", "io_extra_files", "read_io_spec"]

IO_EXTRA_FILE = "deltafleet_io.json"
IO_SPEC_VERSION = 1
MAX_IO_SPEC_BYTES = 1 << 20
_threads_set = False
_threads_lock = threading.Lock()


def io_extra_files(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> dict[str, bytes]:
    """The ``_extra_files`` to pass to ``_save_for_lite_interpreter`` (no torch needed here)."""
    doc = {"version": IO_SPEC_VERSION, "inputs": [s.to_wire() for s in inputs],
           "outputs": [s.to_wire() for s in outputs]}
    return {IO_EXTRA_FILE: json.dumps(doc, sort_keys=True).encode()}


def read_io_spec(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The inputs and outputs a ``.ptl`` file declares; ModelRuntimeError (one line) if it is
    not a TorchScript archive or declares none."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            member = next((i for i in z.infolist()
                           if i.filename.count("/") == 2
                           and i.filename.endswith(f"/extra/{IO_EXTRA_FILE}")), None)
            if member is None:
                if not any(n.endswith("/bytecode.pkl") for n in z.namelist()):
                    raise ModelRuntimeError(f"{path.name} is not a TorchScript-lite (.ptl) file")
                raise ModelRuntimeError(
                    f"{path.name} declares no inputs/outputs: save it with "
                    f"_extra_files=io_extra_files(inputs, outputs) ({IO_EXTRA_FILE})")
            if member.file_size > MAX_IO_SPEC_BYTES:
                raise ModelRuntimeError(f"{path.name}: {IO_EXTRA_FILE} is larger than 1 MiB")
            raw = z.read(member)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelRuntimeError(f"{path.name} is not a TorchScript-lite (.ptl) file: "
                                f"{_one_line(e)}") from e
    return parse_io_spec(raw, path.name)


def parse_io_spec(raw: bytes, name: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != IO_SPEC_VERSION:
            raise WireError(f"expected an object with version {IO_SPEC_VERSION}")
        parts = []
        for part in ("inputs", "outputs"):
            specs = doc.get(part)
            if not isinstance(specs, list) or not specs:
                raise WireError(f"{part} must be a non-empty list")
            parsed = tuple(TensorSpec.from_wire(s) for s in specs)
            names = [s.name for s in parsed]
            if len(set(names)) != len(names):
                raise WireError(f"{part} repeat a name")
            for s in parsed:
                np.dtype(s.dtype)  # TypeError for a dtype numpy cannot feed
            parts.append(parsed)
    except (ValueError, TypeError, WireError) as e:
        raise ModelRuntimeError(f"{name}: {IO_EXTRA_FILE} is invalid: {_one_line(e)}") from e
    return parts[0], parts[1]


def _set_threads(torch: Any) -> None:
    """One intra-op thread, like the other adapters (process-wide in torch: set once)."""
    global _threads_set
    with _threads_lock:
        if _threads_set:
            return
        torch.set_num_threads(1)
        # only settable before any inter-op work has started in the process
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        _threads_set = True


class TorchLiteModel(LoadedModel):
    """A ``.ptl`` model in torch's lite interpreter (``_load_for_lite_interpreter``), CPU.

    The lite interpreter is not documented as thread-safe: ``run`` holds a lock around each
    call, as the TFLite adapter does. Inference runs under ``torch.inference_mode``.
    """

    format = "ptl"
    runtime = "torch"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        self.inputs, self.outputs = read_io_spec(path)
        self._torch: Any = _import("torch", "ptl", runtime="torch")
        self._lock = threading.Lock()
        try:
            mobile = _import("torch.jit.mobile", "ptl", runtime="torch")
            _set_threads(self._torch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self._module: Any = mobile._load_for_lite_interpreter(str(path),
                                                                      map_location="cpu")
        except ModelRuntimeError:
            raise
        except Exception as e:
            raise ModelRuntimeError(f"torch cannot load {path.name}: {_one_line(e)}") from e
        self._dtypes = [np.dtype(s.dtype) for s in self.inputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [s.name for s in self.inputs]
        missing = sorted(set(names) - set(feeds))
        unknown = sorted(set(feeds) - set(names))
        if missing or unknown:
            raise ModelRuntimeError(
                f"torch inference failed: missing inputs {missing}, unknown {unknown}")
        torch = self._torch
        with self._lock:
            module = self._module
            if module is None:
                raise ModelRuntimeError("model is closed")
            try:
                args = [torch.from_numpy(_writable(feeds[n], dt))
                        for n, dt in zip(names, self._dtypes, strict=True)]
                with torch.inference_mode():
                    result = module(*args)
                return self._outputs(result)
            except ModelRuntimeError:
                raise
            except Exception as e:
                raise ModelRuntimeError(f"torch inference failed: {_one_line(e)}") from e

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        names = [s.name for s in self.outputs]
        torch = self._torch
        if isinstance(result, torch.Tensor):
            values = [result]
        elif isinstance(result, (tuple, list)):
            values = list(result)
        elif isinstance(result, dict):
            absent = sorted(set(names) - set(result))
            if absent:
                raise ModelRuntimeError(f"torch model returned no output {absent[0]!r}")
            values = [result[n] for n in names]
        else:
            raise ModelRuntimeError(f"torch model returned {type(result).__name__}, not tensors")
        if len(values) != len(names):
            raise ModelRuntimeError(f"torch model returned {len(values)} outputs, "
                                    f"declared {len(names)}")
        out: dict[str, np.ndarray] = {}
        for name, value in zip(names, values, strict=True):
            if not isinstance(value, torch.Tensor):
                raise ModelRuntimeError(f"torch output {name!r} is {type(value).__name__}, "
                                        "not a tensor")
            out[name] = value.detach().cpu().numpy()
        return out

    def close(self) -> None:
        with self._lock:
            self._module = None


def _writable(value: Any, dtype: np.dtype) -> np.ndarray:
    """``value`` as a C-contiguous, writable array of ``dtype`` (torch.from_numpy warns on
    read-only arrays, such as golden inputs decoded over their bytes)."""
    a = np.ascontiguousarray(value, dtype=dtype)
    return a if a.flags.writeable else a.copy()
