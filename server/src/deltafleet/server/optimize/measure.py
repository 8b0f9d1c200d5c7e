"""Run a model on this machine and compare it with its parent: latency, output deviation,
accuracy. The runtimes are the server's ``[optimize]`` extra (onnxruntime, ai-edge-litert).

Samples are dicts of arrays named like the model's inputs whose first axis is the sample
axis (an ``.npz`` as ``--calibration`` / ``--eval`` take it). :func:`batches` cuts them into
what the model accepts: one sample at a time along a dynamic first dimension (as a device
serves; dynamic INT8 quantizes activations per run, so its outputs depend on the batch),
else chunks of the fixed first dimension (the remainder is dropped).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from deltafleet.shared import TensorSpec

from ..errors import UsageError
from .errors import OptimizeError

__all__ = ["Runner", "accuracy", "batches", "deviation", "latency_ms", "load_npz",
           "random_samples"]

MAX_BATCH = 1


def load_npz(path: Path, inputs: tuple[TensorSpec, ...], *, labels: bool = False
             ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The arrays of an ``.npz`` for these model inputs (and its ``labels``); UsageError,
    one line, for a file that does not fit."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"{Path(path).name}: not a readable .npz ({e})") from e
    y = arrays.pop("labels", None)
    if labels and y is None:
        raise UsageError(f"{Path(path).name}: no 'labels' array (the eval file needs inputs "
                         "named like the model's and 'labels')")
    wanted = {s.name: s for s in inputs}
    if set(arrays) != set(wanted):
        raise UsageError(f"{Path(path).name}: arrays {sorted(arrays)} do not match the model "
                         f"inputs {sorted(wanted)}")
    out: dict[str, np.ndarray] = {}
    n = None
    for name, arr in arrays.items():
        spec = wanted[name]
        try:
            arr = arr.astype(np.dtype(spec.dtype), copy=False)
        except TypeError as e:
            raise UsageError(f"{Path(path).name}: {name!r} cannot be {spec.dtype}") from e
        if arr.ndim != len(spec.shape):
            raise UsageError(f"{Path(path).name}: {name!r} has shape {list(arr.shape)}, the "
                             f"model wants {list(spec.shape)} (first axis: the samples)")
        if n is not None and arr.shape[0] != n:
            raise UsageError(f"{Path(path).name}: the arrays have different sample counts")
        n = arr.shape[0]
        out[name] = np.ascontiguousarray(arr)
    if y is not None and n is not None and len(y) != n:
        raise UsageError(f"{Path(path).name}: {len(y)} labels for {n} samples")
    return out, (None if y is None else np.asarray(y).astype(np.int64))


def random_samples(inputs: tuple[TensorSpec, ...], n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal samples (dynamic dimensions as 1) when no inputs were given."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in s.shape]
        first = shape[0] if shape else 1
        reps = max(1, n // max(1, first)) * first if shape else 1
        full = [reps, *shape[1:]] if shape else []
        out[s.name] = rng.standard_normal(full).astype(np.dtype(s.dtype))
    return out


def batches(inputs: tuple[TensorSpec, ...], samples: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    if not samples:
        return []
    n = min(len(a) for a in samples.values())
    first = inputs[0].shape[0] if inputs and inputs[0].shape else None
    fixed = isinstance(first, int) and first > 0
    step = int(first) if fixed else MAX_BATCH  # type: ignore[arg-type]
    stop = n - step + 1 if fixed else n
    return [{k: v[i:i + step] for k, v in samples.items()} for i in range(0, max(stop, 0), step)]


class Runner:
    """A model loaded in the runtime its format needs, one intra-op thread (figures then
    compare kernels, not how many cores a run happened to get)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.format = fmt
        try:
            if fmt == "onnx":
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.log_severity_level = 3
                self._ort = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                self.runtime = f"onnxruntime {ort.__version__}"
            elif fmt == "tflite":
                from ai_edge_litert.interpreter import Interpreter

                self._tfl = Interpreter(model_path=str(path), num_threads=1)
                self._tfl.allocate_tensors()
                self._shapes: dict[int, tuple[int, ...]] = {}
                import importlib.metadata as md

                self.runtime = f"litert {md.version('ai-edge-litert')}"
            else:
                raise UsageError(f"cannot run a {fmt} model on the server (no runtime here)")
        except ImportError as e:
            raise OptimizeError(f"the {fmt} runtime is missing on the server: install "
                                f"deltafleet-server[optimize] ({e})") from e
        except (UsageError, OptimizeError):
            raise
        except Exception as e:  # noqa: BLE001 - the runtime refuses the model
            raise OptimizeError(f"{fmt} runtime cannot load {Path(path).name}: "
                                f"{' '.join(str(e).split())[:200]}") from e

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The first output for one batch."""
        if self.format == "onnx":
            return np.asarray(self._ort.run(None, feeds)[0])
        it = self._tfl
        details = {d["name"]: d for d in it.get_input_details()}
        for name, arr in feeds.items():
            d = details[name]
            if tuple(d["shape"]) != arr.shape:
                it.resize_tensor_input(d["index"], list(arr.shape))
                it.allocate_tensors()
                details = {x["name"]: x for x in it.get_input_details()}
            it.set_tensor(details[name]["index"], arr)
        it.invoke()
        return np.array(it.get_tensor(it.get_output_details()[0]["index"]))

    def outputs(self, feed_batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        return np.concatenate([self.run(b) for b in feed_batches], axis=0)


def latency_ms(runner: Runner, feed_batches: list[dict[str, np.ndarray]], *,
               budget_s: float = 0.5, min_runs: int = 5) -> float:
    """Median milliseconds per sample, after two warm-up runs."""
    if not feed_batches:
        return float("nan")
    for b in feed_batches[:2]:
        runner.run(b)
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 2000):
        b = feed_batches[i % len(feed_batches)]
        t0 = time.perf_counter()
        runner.run(b)
        times.append((time.perf_counter() - t0) * 1000 / len(next(iter(b.values()))))
        i += 1
    return float(statistics.median(times))


def deviation(parent: np.ndarray, variant: np.ndarray) -> dict[str, Any]:
    """max / mean absolute difference of the first output, the max relative to the parent's
    range, and for a classifier ([N, C], C > 1) how often the top-1 class agrees."""
    p = parent.astype(np.float64)
    v = variant.astype(np.float64).reshape(p.shape)
    diff = np.abs(p - v)
    scale = float(np.max(np.abs(p))) or 1.0
    out: dict[str, Any] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                           "max_rel": float(diff.max()) / scale, "samples": int(p.shape[0])}
    if p.ndim == 2 and p.shape[1] > 1:
        out["top1_agreement"] = float(np.mean(p.argmax(1) == v.argmax(1)))
    return out


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    n = min(len(outputs), len(labels))
    return float(np.mean(outputs[:n].reshape(n, -1).argmax(1) == labels[:n]))
