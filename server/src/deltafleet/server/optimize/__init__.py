"""The variant factory: make INT8 / FP16 / pruned variants of a registered version, measure
each against its parent on this machine, and register it beside the parent.

Order (all or nothing): resolve the version and its parent variant -> refuse names that
exist -> make every variant in a temp dir (``transforms``) -> inspect it (a transform that
wrote an invalid model is a bug, reported, never registered) -> measure it against the parent
(``measure``: size, zstd full-artifact size, latency, output deviation, accuracy on
``--eval``) -> refuse ALL if any variant loses more than ``max_accuracy_drop_points``
(:class:`AccuracyRefused`) -> register each with ``catalog.add_model_version``, its figures
in ``Variant.info["optimize"]``. The caller's session is the transaction.

A recipe is one precision (int8, fp16 or none) plus optional pruning: ``--int8 --fp16
--prune 50%`` makes two variants, ``int8-pruned50`` and ``fp16-pruned50``. Pruning runs
first, so its zeros survive symmetric INT8 (zero point 0).
"""

from __future__ import annotations

import hashlib
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ..catalog import add_model_version, inspect_model, resolve_version
from ..catalog.inspect import ModelInfo
from ..codecs import compress_full
from ..errors import CatalogError, ConflictError, NotFoundError, UsageError
from ..store.blobs import BlobStore
from ..store.models import Variant
from . import measure, transforms
from .errors import AccuracyRefused, OptimizeError

__all__ = ["AccuracyRefused", "Made", "OptimizeError", "OptimizeOptions", "Recipe",
           "make_variants", "optimize_version", "parse_prune", "recipes"]

DEFAULT_MAX_ACCURACY_DROP_POINTS = 1.0
MAX_MEASURE_SAMPLES = 256


@dataclass(frozen=True, slots=True)
class Recipe:
    precision: str | None = None  # "int8" | "fp16" | None (keep the parent's)
    prune_fraction: float | None = None
    prune_mode: str = "unstructured"

    def suffix(self) -> str:
        parts = [self.precision] if self.precision else []
        if self.prune_fraction:
            parts.append(f"pruned{round(self.prune_fraction * 100)}"
                         + ("s" if self.prune_mode == "structured" else ""))
        return "-".join(parts)


@dataclass(frozen=True, slots=True)
class OptimizeOptions:
    recipes: tuple[Recipe, ...]
    parent_variant: str | None = None
    name: str | None = None  # the new variant's name (one recipe only)
    calibration: Path | None = None  # .npz: INT8 static (ONNX) / calibration (TFLite)
    eval: Path | None = None  # .npz with inputs and labels
    max_accuracy_drop_points: float = DEFAULT_MAX_ACCURACY_DROP_POINTS


@dataclass(frozen=True, slots=True)
class Made:
    recipe: Recipe
    name: str
    path: Path
    precision: str
    info: ModelInfo
    figures: dict[str, Any]


def parse_prune(text: str | None) -> float | None:
    """``50%`` or ``0.5`` -> 0.5; UsageError for anything outside (0, 1)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    if not m:
        raise UsageError(f"invalid --prune {text!r}: use a percentage like 50%")
    value = float(m.group(1)) / (100 if m.group(2) or float(m.group(1)) > 1 else 1)
    if not 0 < value < 1:
        raise UsageError(f"invalid --prune {text!r}: between 0% and 100% exclusive")
    return value


def recipes(int8: bool, fp16: bool, prune: float | None,
            prune_mode: str = "unstructured") -> tuple[Recipe, ...]:
    if prune_mode not in ("structured", "unstructured"):
        raise UsageError(f"invalid --prune-mode {prune_mode!r}: use structured or unstructured")
    precisions: list[str | None] = [p for p, on in (("int8", int8), ("fp16", fp16)) if on]
    if not precisions and prune is None:
        raise UsageError("nothing to make: give --int8, --fp16 and/or --prune")
    return tuple(Recipe(p, prune, prune_mode) for p in precisions or [None])


def _variant_name(parent: str, recipe: Recipe) -> str:
    return recipe.suffix() if parent == "default" else f"{parent}-{recipe.suffix()}"


def optimize_version(session: Session, blobs: BlobStore, spec: str,
                     opts: OptimizeOptions) -> list[Variant]:
    """Make, measure and register the variants of ``spec`` (NAME:VERSION) that ``opts``
    asks for; the rows added (see the module docstring for the order and what is refused)."""
    mv = resolve_version(session, spec)
    by_name = {v.name: v for v in mv.variants}
    parent_name = opts.parent_variant or ("default" if "default" in by_name else
                                          (next(iter(by_name)) if len(by_name) == 1 else None))
    if parent_name is None:
        raise UsageError(f"{mv.model.name}:{mv.version} has variants {sorted(by_name)}: "
                         "choose the parent with --variant")
    parent = by_name.get(parent_name)
    if parent is None:
        raise NotFoundError(f"{mv.model.name}:{mv.version} has no variant {parent_name!r} "
                            f"(it has {', '.join(sorted(by_name))})")
    if opts.name is not None and len(opts.recipes) != 1:
        raise UsageError("--name names one variant: give one precision")
    names = [opts.name or _variant_name(parent_name, r) for r in opts.recipes]
    for n in names:
        if n in by_name:
            raise ConflictError(f"{mv.model.name}:{mv.version} already has variant {n!r}; "
                                "versions are immutable")
    if not blobs.has(parent.artifact_sha256):
        raise NotFoundError(f"the model file of {parent_name} ({parent.artifact_sha256[:12]}) "
                            "is missing from the blob store")
    with tempfile.TemporaryDirectory(prefix="deltafleet-optimize-") as tmp:
        made = make_variants(blobs.path(parent.artifact_sha256), parent.format,
                             parent.info or {}, opts, Path(tmp), names=names,
                             parent_precision=parent.precision)
        rows = []
        for m in made:
            extra: dict[str, Any] = {
                "parent": {"variant": parent_name, "sha256": parent.artifact_sha256},
                "optimize": m.figures,
            }
            golden = (parent.info or {}).get("golden")
            if golden and _same_io(parent.info or {}, m.info.to_json()):
                extra["golden"] = golden
            rows.append(add_model_version(session, blobs, mv.model.name, mv.version, m.path,
                                          variant=m.name, precision=m.precision,
                                          extra_info=extra))
    return rows


def _same_io(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("inputs") == b.get("inputs")


def make_variants(parent_path: Path, fmt: str, parent_info: dict[str, Any],
                  opts: OptimizeOptions, work_dir: Path, *, names: list[str],
                  parent_precision: str = "fp32") -> list[Made]:
    """Make and measure every recipe's variant of the model at ``parent_path`` (no
    database); AccuracyRefused if any loses more than its budget."""
    info = inspect_model(parent_path)
    samples, source = _samples(info, parent_info, opts)
    sample_batches = measure.batches(info.inputs, samples)
    eval_batches: list[dict[str, Any]] = []
    labels = None
    if opts.eval is not None:
        eval_samples, labels = measure.load_npz(opts.eval, info.inputs, labels=True)
        eval_batches = measure.batches(info.inputs, eval_samples)
    parent_run = measure.Runner(parent_path, fmt)
    parent_out = parent_run.outputs(sample_batches)
    parent_latency = measure.latency_ms(parent_run, sample_batches)
    parent_acc = (measure.accuracy(parent_run.outputs(eval_batches), labels)
                  if labels is not None else None)
    parent_size = parent_path.stat().st_size
    parent_zstd = _compressed_bytes(parent_path)
    made: list[Made] = []
    refused: list[str] = []
    for recipe, name in zip(opts.recipes, names, strict=True):
        t0 = time.perf_counter()
        out_dir = work_dir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        calibrate = opts.calibration is not None or (fmt == "tflite" and source != "random normal")
        path, steps = _apply(recipe, parent_path, fmt, out_dir, info,
                             sample_batches if calibrate else [])
        seconds = time.perf_counter() - t0
        try:
            vinfo = inspect_model(path)
        except CatalogError as e:
            raise OptimizeError(f"making {name} wrote an invalid model: {e}") from e
        run = measure.Runner(path, fmt)
        out = run.outputs(sample_batches)
        latency = measure.latency_ms(run, sample_batches)
        size = path.stat().st_size
        zstd_bytes = _compressed_bytes(path)
        figures: dict[str, Any] = {
            "recipe": {"precision": recipe.precision, **steps},
            "measured_on": {"host": platform.node(), "machine": platform.machine(),
                            "runtime": run.runtime},
            "size_bytes": size, "parent_size_bytes": parent_size,
            "size_ratio": size / parent_size,
            "compressed_bytes": zstd_bytes, "parent_compressed_bytes": parent_zstd,
            "compressed_ratio": zstd_bytes / parent_zstd,
            "latency_ms": {"parent": parent_latency, "variant": latency,
                           "ratio": latency / parent_latency if parent_latency else None,
                           "threads": 1, "inputs": source},
            "deviation": {**measure.deviation(parent_out, out), "inputs": source},
            "accuracy": None,
            "optimize_seconds": round(seconds, 3),
        }
        if labels is not None and parent_acc is not None:
            acc = measure.accuracy(run.outputs(eval_batches), labels)
            drop = (parent_acc - acc) * 100
            figures["accuracy"] = {"parent": parent_acc, "variant": acc, "drop_points": drop,
                                   "samples": int(len(labels)),
                                   "max_drop_points": opts.max_accuracy_drop_points,
                                   "eval_sha256": _sha256(opts.eval)}
            if drop > opts.max_accuracy_drop_points:
                refused.append(f"{name} {acc:.1%} vs parent {parent_acc:.1%} "
                               f"(-{drop:.1f} points)")
        precision = recipe.precision or parent_precision
        made.append(Made(recipe, name, path, precision, vinfo, figures))
    if refused:
        raise AccuracyRefused(
            f"refused, accuracy drop over {opts.max_accuracy_drop_points:g} point(s): "
            f"{'; '.join(refused)}; nothing registered")
    return made


def _samples(info: ModelInfo, parent_info: dict[str, Any],
             opts: OptimizeOptions) -> tuple[dict[str, Any], str]:
    """What latency and deviation are measured on (and INT8 calibrates on): the calibration
    file, else the parent's golden inputs, else the eval inputs, else random normal."""
    import numpy as np

    from deltafleet.shared import GoldenInput

    if opts.calibration is not None:
        arrays, _ = measure.load_npz(opts.calibration, info.inputs)
        return _cap(arrays), "calibration"
    golden = parent_info.get("golden") or []
    if golden:
        samples = [GoldenInput.from_wire(g) for g in golden]
        arrays = {}
        for spec in info.inputs:
            parts = []
            for sample in samples:
                t = next(t for t in sample.tensors if t.name == spec.name)
                parts.append(np.frombuffer(t.data, dtype=np.dtype(t.dtype)).reshape(t.shape))
            arrays[spec.name] = np.concatenate(parts, axis=0)
        return arrays, "golden"
    if opts.eval is not None:
        arrays, _ = measure.load_npz(opts.eval, info.inputs, labels=True)
        return _cap(arrays), "eval"
    return measure.random_samples(info.inputs), "random normal"


def _cap(arrays: dict[str, Any]) -> dict[str, Any]:
    return {k: v[:MAX_MEASURE_SAMPLES] for k, v in arrays.items()}


def _apply(recipe: Recipe, src: Path, fmt: str, out_dir: Path, info: ModelInfo,
           calibration: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    steps: dict[str, Any] = {"prune": None}
    cur = src
    if fmt == "onnx":
        if recipe.prune_fraction:
            cur, steps["prune"] = transforms.onnx_prune(cur, out_dir / "pruned.onnx",
                                                        recipe.prune_fraction, recipe.prune_mode)
        if recipe.precision == "int8":
            if calibration:
                cur = transforms.onnx_int8_static(cur, out_dir / "int8.onnx", calibration)
                steps["int8"] = "static-qdq (per-channel weights, calibrated activations)"
            else:
                cur = transforms.onnx_int8_dynamic(cur, out_dir / "int8.onnx")
                steps["int8"] = "dynamic (per-tensor weights, activations at run time)"
        elif recipe.precision == "fp16":
            cur = transforms.onnx_fp16(cur, out_dir / "fp16.onnx")
            steps["fp16"] = "float16 weights and compute, float32 inputs and outputs"
    elif fmt == "tflite":
        if recipe.prune_fraction or recipe.precision == "fp16":
            raise UsageError("TFLite variants: only --int8 (full-integer, via the LiteRT "
                             "quantizer); --fp16 and --prune need the TensorFlow converter")
        if recipe.precision == "int8":
            cur = transforms.tflite_int8(cur, out_dir / "int8.tflite", calibration,
                                         [s.name for s in info.inputs])
            steps["int8"] = "full-integer (int8 weights per channel and activations, float I/O)"
    else:
        raise UsageError(f"optimize does not handle {fmt} models")
    if cur == src:
        raise UsageError("nothing to make")
    return cur, steps


def _compressed_bytes(path: Path) -> int:
    """The size of the zstd frame a full install of this file ships (``compress_full``)."""
    return compress_full(path, lambda piece: None)


def _sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()
