"""Which runtimes, at which versions, can load a model: pure tables, no I/O.

ONNX: ONNX Runtime implements every ai.onnx opset up to the one of its release (back to 7) and
IR versions up to its own; ``ORT_RELEASES`` is its published version matrix (release -> newest
ai.onnx opset, ai.onnx.ml opset, IR version). A model needs the oldest release whose three
numbers cover the model's. ``com.microsoft`` ops are ONNX Runtime contrib ops: only ONNX
Runtime loads them, and the table says nothing finer about them.

TFLite: every builtin operator code carries a version; ``TFLITE_OP_MIN_RUNTIME`` is the
TF Lite runtime version each (op, version) first appeared in (the table TF Lite's own
``runtime_version.cc`` keeps, for the common ops). tflite-runtime follows TensorFlow's
numbering. LiteRT (ai-edge-litert) was cut from TensorFlow 2.17 and later, so an op whose
minimum is at most ``LITERT_BASE_TF`` loads in every LiteRT release; above that the table
cannot say which LiteRT release added it, and the result says so instead of guessing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LITERT_BASE_TF", "ORT_RELEASES", "TFLITE_OP_MIN_RUNTIME", "onnx_runtimes",
           "tflite_runtimes"]

# release, ai.onnx opset, ai.onnx.ml opset, IR version (oldest first)
ORT_RELEASES: tuple[tuple[str, int, int, int], ...] = (
    ("1.0", 11, 2, 6), ("1.3", 12, 2, 7), ("1.6", 13, 2, 7), ("1.8", 14, 2, 7),
    ("1.9", 15, 2, 7), ("1.10", 15, 2, 8), ("1.11", 16, 2, 8), ("1.12", 17, 3, 8),
    ("1.14", 18, 3, 8), ("1.15", 19, 3, 9), ("1.17", 20, 4, 9), ("1.18", 21, 4, 10),
    ("1.20", 21, 5, 10), ("1.21", 22, 5, 10), ("1.23", 23, 5, 11),
)

LITERT_BASE_TF = "2.17.0"

# (op, version) -> the first TF Lite runtime that has it
TFLITE_OP_MIN_RUNTIME: dict[tuple[str, int], str] = {
    **{("ADD", v): r for v, r in ((1, "1.5.0"), (2, "1.14.0"), (3, "2.4.0"), (4, "2.6.0"))},
    **{("AVERAGE_POOL_2D", v): r for v, r in ((1, "1.5.0"), (2, "1.14.0"), (3, "2.3.0"))},
    **{("BATCH_MATMUL", v): r for v, r in ((1, "2.3.0"), (2, "2.3.0"), (3, "2.4.0"),
                                          (4, "2.5.0"))},
    **{("CAST", v): r for v, r in ((1, "1.5.0"), (2, "2.7.0"), (3, "2.8.0"), (4, "2.9.0"))},
    **{("CONCATENATION", v): r for v, r in ((1, "1.5.0"), (2, "1.14.0"), (3, "2.3.0"))},
    **{("CONV_2D", v): r for v, r in ((1, "1.5.0"), (2, "1.14.0"), (3, "1.14.0"),
                                     (4, "2.3.0"), (5, "2.4.0"), (6, "2.9.0"))},
    **{("DEPTHWISE_CONV_2D", v): r for v, r in ((1, "1.5.0"), (2, "1.12.0"), (3, "1.14.0"),
                                               (4, "2.2.0"), (5, "2.3.0"), (6, "2.3.0"))},
    **{("DEQUANTIZE", v): r for v, r in ((1, "1.13.1"), (2, "1.14.0"), (3, "1.15.0"),
                                        (4, "2.2.0"), (5, "2.7.0"))},
    **{("FULLY_CONNECTED", v): r for v, r in ((1, "1.5.0"), (2, "1.10.0"), (3, "1.14.0"),
                                             (4, "1.14.0"), (5, "2.0.0"), (6, "2.1.0"),
                                             (7, "2.3.0"), (8, "2.3.0"), (9, "2.3.0"))},
    **{("GATHER", v): r for v, r in ((1, "1.6.0"), (2, "1.14.0"), (3, "1.15.0"), (4, "2.4.0"),
                                    (5, "2.5.0"))},
    **{("HARD_SWISH", 1): "1.15.0"},
    **{("LEAKY_RELU", v): r for v, r in ((1, "1.13.1"), (2, "2.3.0"))},
    **{("LOGISTIC", v): r for v, r in ((1, "1.14.0"), (2, "1.14.0"), (3, "2.3.0"))},
    **{("MAX_POOL_2D", v): r for v, r in ((1, "1.5.0"), (2, "1.14.0"), (3, "2.3.0"))},
    **{("MEAN", v): r for v, r in ((1, "1.6.0"), (2, "1.14.0"), (3, "2.4.0"))},
    **{("MUL", v): r for v, r in ((1, "1.5.0"), (2, "1.14.0"), (3, "1.15.0"), (4, "2.3.0"),
                                 (5, "2.6.0"))},
    **{("PAD", v): r for v, r in ((1, "1.5.0"), (2, "1.14.0"), (3, "2.4.0"), (4, "2.6.0"))},
    **{("QUANTIZE", v): r for v, r in ((1, "1.14.0"), (2, "1.15.0"), (3, "2.7.0"))},
    **{("RELU", v): r for v, r in ((1, "1.5.0"), (2, "2.1.0"), (3, "2.5.0"))},
    **{("RELU6", v): r for v, r in ((1, "1.5.0"), (2, "1.14.0"), (3, "2.5.0"))},
    **{("RESHAPE", 1): "1.5.0"},
    **{("RESIZE_BILINEAR", v): r for v, r in ((1, "1.7.0"), (2, "1.14.0"), (3, "2.2.0"),
                                             (4, "2.5.0"))},
    **{("SOFTMAX", v): r for v, r in ((1, "1.5.0"), (2, "1.14.0"), (3, "2.3.0"))},
    **{("SQUEEZE", v): r for v, r in ((1, "1.6.0"), (2, "2.5.0"))},
    **{("STRIDED_SLICE", v): r for v, r in ((1, "1.6.0"), (2, "1.14.0"), (3, "2.1.0"),
                                           (4, "2.2.0"), (5, "2.5.0"), (6, "2.6.0"))},
    **{("SUB", v): r for v, r in ((1, "1.6.0"), (2, "1.14.0"), (3, "2.3.0"), (4, "2.4.0"),
                                 (5, "2.4.0"))},
    **{("TANH", v): r for v, r in ((1, "1.14.0"), (2, "1.14.0"), (3, "2.3.0"))},
    **{("TRANSPOSE", v): r for v, r in ((1, "1.6.0"), (2, "1.14.0"), (3, "1.15.0"),
                                       (4, "2.3.0"), (5, "2.4.0"))},
}


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def onnx_runtimes(opset: dict[str, int], ir_version: int | None,
                  ops: tuple[str, ...]) -> list[dict[str, Any]]:
    """Which ONNX Runtime release first loads a model with this opset, IR version and ops."""
    core = opset.get("ai.onnx", 0)
    ml = opset.get("ai.onnx.ml", 0)
    ir = ir_version or 0
    unknown = sorted(d for d in opset if d not in ("ai.onnx", "ai.onnx.ml", "com.microsoft"))
    why = f"ai.onnx opset {core}" + (f", ai.onnx.ml opset {ml}" if ml else "") + f", IR {ir}"
    entry: dict[str, Any] = {"runtime": "onnxruntime", "format": "onnx"}
    fits = [r for r in ORT_RELEASES if core <= r[1] and ml <= r[2] and ir <= r[3]]
    if fits:
        entry["min_version"] = fits[0][0]
        entry["why"] = why
    else:
        newest = ORT_RELEASES[-1]
        entry["min_version"] = None
        entry["why"] = (f"{why}: newer than the table knows (up to onnxruntime {newest[0]}: "
                        f"opset {newest[1]}, IR {newest[3]}); check the newest onnxruntime")
    contrib = sorted(o for o in ops if o.startswith("com.microsoft."))
    if contrib:
        entry["why"] += (f"; uses onnxruntime contrib ops ({', '.join(contrib)}): "
                         "no other ONNX runtime loads it")
    if unknown:
        entry["why"] += f"; custom op domains {', '.join(unknown)} need their own kernels"
        entry["min_version"] = None
    return [entry]


def tflite_runtimes(op_versions: dict[str, int],
                    min_runtime_metadata: str | None = None) -> list[dict[str, Any]]:
    """tflite-runtime and LiteRT versions that load a model with these builtin op versions
    (``min_runtime_metadata``: the converter's ``min_runtime_version`` metadata, if any)."""
    needed, binding = "1.5.0", "the oldest TF Lite runtime"
    unknown: list[str] = []
    for op, version in sorted(op_versions.items()):
        if op.startswith("CUSTOM"):
            unknown.append(f"{op} (custom op: needs its kernel registered)")
            continue
        v = TFLITE_OP_MIN_RUNTIME.get((op, version))
        if v is None:
            unknown.append(f"{op} v{version}")
            continue
        if _vkey(v) > _vkey(needed) or (binding.startswith("the oldest")
                                        and _vkey(v) >= _vkey(needed)):
            needed, binding = v, f"{op} v{version}"
    if min_runtime_metadata and _vkey(min_runtime_metadata) > _vkey(needed):
        needed, binding = min_runtime_metadata, "the model's min_runtime_version metadata"
    note = f"; not in the table: {', '.join(unknown)}" if unknown else ""
    tfl = {"runtime": "tflite-runtime", "format": "tflite",
           "min_version": needed if not unknown else None,
           "why": f"needs TF Lite {needed} ({binding}){note}"}
    litert: dict[str, Any] = {"runtime": "litert", "format": "tflite"}
    if unknown:
        litert["min_version"] = None
        litert["why"] = f"ops not in the table{note}: check them against the LiteRT release"
    elif _vkey(needed) <= _vkey(LITERT_BASE_TF):
        litert["min_version"] = "1.0"
        litert["why"] = f"needs TF Lite {needed}; every LiteRT release has TF Lite {LITERT_BASE_TF}+"
    else:
        litert["min_version"] = None
        litert["why"] = (f"needs TF Lite {needed}, newer than LiteRT's base {LITERT_BASE_TF}: "
                         "which LiteRT release added it is not derived here")
    return [tfl, litert]
