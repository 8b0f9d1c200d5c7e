"""Model transforms: each reads one model file and writes one new file, nothing else.

ONNX: magnitude pruning of the weight initializers (of MatMul, Gemm and Conv), INT8 through
``onnxruntime.quantization`` (dynamic: weights int8 per tensor, activations quantized at run
time; static: QDQ, per-channel weights, activations calibrated on the given samples), FP16
through ``onnxconverter_common.float16`` (inputs and outputs stay float32).
TFLite: full-integer INT8 through the TF Lite calibrator and quantizer that ship inside
ai-edge-litert (no TensorFlow): activations calibrated on the given samples, weights int8
per channel, float32 inputs and outputs (QUANTIZE / DEQUANTIZE at the edges).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .errors import OptimizeError

__all__ = ["onnx_fp16", "onnx_int8_dynamic", "onnx_int8_static", "onnx_prune", "tflite_int8"]

_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OptimizeError(f"{module} is missing on the server: install "
                            f"deltafleet-server[optimize] ({e})") from e


def _save(model: Any, out: Path) -> Path:
    import onnx

    onnx.save_model(model, str(out))
    return out


def onnx_prune(src: Path, out: Path, fraction: float, mode: str) -> tuple[Path, dict[str, Any]]:
    """Zero the smallest-magnitude ``fraction`` of each weight tensor (``unstructured``) or
    of its output channels by L2 norm (``structured``: Conv rows / MatMul columns; shapes are
    kept, so every runtime still loads it). Returns the file and what was pruned."""
    import onnx
    from onnx import numpy_helper

    if not 0 < fraction < 1:
        raise UsageError(f"prune fraction {fraction} must be between 0 and 1")
    if mode not in ("structured", "unstructured"):
        raise UsageError(f"invalid prune mode {mode!r}: use structured or unstructured")
    model = onnx.load_model(str(src))
    graph = model.graph
    targets: dict[str, str] = {}
    for node in graph.node:
        index = _WEIGHT_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index:
            if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
                targets[node.input[index]] = "Gemm.T"
            else:
                targets[node.input[index]] = node.op_type
    total = zeroed = 0
    tensors = 0
    for i, t in enumerate(graph.initializer):
        op = targets.get(t.name)
        if op is None or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 2:
            continue
        w = numpy_helper.to_array(t).copy()
        if mode == "unstructured":
            k = int(round(w.size * fraction))
            flat = np.abs(w).ravel()
            cut = np.argpartition(flat, k - 1)[:k] if k else np.array([], dtype=np.int64)
            w.ravel()[cut] = 0
        else:
            axis = 0 if op in ("Conv", "Gemm.T") else w.ndim - 1  # the output-channel axis
            moved = np.moveaxis(w, axis, 0)
            norms = np.sqrt((moved.reshape(moved.shape[0], -1) ** 2).sum(axis=1))
            k = int(round(len(norms) * fraction))
            moved[np.argsort(norms)[:k]] = 0
        total += w.size
        zeroed += int((w == 0).sum())
        tensors += 1
        graph.initializer[i].CopyFrom(numpy_helper.from_array(w, t.name))
    if not tensors:
        raise UsageError(f"{src.name} has no float weight tensors of MatMul, Gemm or Conv to prune")
    return _save(model, out), {"mode": mode, "fraction": fraction, "tensors": tensors,
                               "sparsity": zeroed / total if total else 0.0}


class _QuietQuantizer:
    """onnxruntime.quantization logs a pre-processing hint on the root logger: not ours."""

    def __enter__(self) -> None:
        import logging

        self._level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        import logging

        logging.root.setLevel(self._level)


def onnx_int8_dynamic(src: Path, out: Path) -> Path:
    q = _import("onnxruntime.quantization")
    try:
        with _QuietQuantizer():
            q.quantize_dynamic(str(src), str(out), weight_type=q.QuantType.QInt8,
                               per_channel=False)
    except Exception as e:  # noqa: BLE001 - the quantizer's own failures
        raise OptimizeError(f"onnxruntime dynamic quantization failed: {_short(e)}") from e
    return out


def onnx_int8_static(src: Path, out: Path, feed_batches: list[dict[str, np.ndarray]]) -> Path:
    q = _import("onnxruntime.quantization")

    class Reader(q.CalibrationDataReader):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self._it = iter(feed_batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    try:
        with _QuietQuantizer():
            q.quantize_static(str(src), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
                              per_channel=True, activation_type=q.QuantType.QInt8,
                              weight_type=q.QuantType.QInt8)
    except Exception as e:  # noqa: BLE001
        raise OptimizeError(f"onnxruntime static quantization failed: {_short(e)}") from e
    return out


def onnx_fp16(src: Path, out: Path) -> Path:
    import warnings

    import onnx

    f16 = _import("onnxconverter_common.float16")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "truncated to 1e-07": FP16's range
            model = f16.convert_float_to_float16(onnx.load_model(str(src)), keep_io_types=True)
    except Exception as e:  # noqa: BLE001
        raise OptimizeError(f"FP16 conversion failed: {_short(e)}") from e
    return _save(model, out)


def tflite_int8(src: Path, out: Path, feed_batches: list[dict[str, np.ndarray]],
                input_names: list[str]) -> Path:
    """Full-integer INT8 with float32 I/O, calibrated on ``feed_batches``."""
    if not feed_batches:
        raise UsageError("TFLite INT8 calibrates activation ranges: pass --calibration "
                         "FILE.npz (or register the parent with golden inputs)")
    wrapper = _import("ai_edge_litert._pywrap_tensorflow_lite_calibration_wrapper")
    try:
        # the wrapper does not own the model bytes: keep them alive until it is done
        content = src.read_bytes()
        calibrator = wrapper.CalibrationWrapper(content, [], [])
        for b in feed_batches:
            arrays = [b[name] for name in input_names]
            calibrator.Prepare([list(a.shape) for a in arrays])
            calibrator.FeedTensor(arrays)
        f32, i8, i32 = (np.dtype(t).num for t in (np.float32, np.int8, np.int32))
        data = calibrator.QuantizeModel(f32, f32, False, i8, i32, False, False)
    except Exception as e:  # noqa: BLE001 - the quantizer's own failures
        raise OptimizeError(f"TF Lite quantizer failed: {_short(e)}") from e
    del calibrator, content
    out.write_bytes(bytes(data))
    return out


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
