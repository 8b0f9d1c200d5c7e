"""The variant factory's figures: per model and recipe, size ratio, zstd (full-artifact)
size ratio, accuracy drop, output deviation, latency ratio and time to optimize, measured
here with the code `fleetctl model optimize` runs (``optimize.make_variants``).

    .venv/bin/python -m scripts.bench.optimize [--resnet-int8-max-mb 26]
        [--resnet-pruned-max-mb 14] [--max-accuracy-drop 1.0] [--targets scripts/bench/targets.json]

Models: an MLP trained on scikit-learn's digits (ONNX and TFLite; accuracy on the held-out
split) and a ResNet-50-shaped FP32 ONNX of ~102 MB (He-initialised weights, nothing
downloaded; random-normal inputs, so no accuracy). Prints one JSON document; ``"ok": false``
(exit 1) when a check fails: ResNet INT8 file <= --resnet-int8-max-mb MB, ResNet INT8 + 50%
pruning as a zstd full artifact <= --resnet-pruned-max-mb MB, digits INT8 accuracy drop <=
--max-accuracy-drop points (MB = 10^6 bytes). ``BENCH_QUICK=1`` skips the ResNet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MB = 1_000_000


def _row(model: str, made: Any, built_s: float) -> dict[str, Any]:
    f = made.figures
    acc = f.get("accuracy") or {}
    return {
        "model": model, "variant": made.name, "precision": made.precision,
        "scheme": made.info.quantization.get("scheme"),
        "size_bytes": f["size_bytes"], "parent_size_bytes": f["parent_size_bytes"],
        "size_ratio": round(f["size_ratio"], 4),
        "compressed_bytes": f["compressed_bytes"],
        "compressed_ratio_vs_parent_file": round(f["compressed_bytes"] / f["parent_size_bytes"], 4),
        "reduction_x": round(f["parent_size_bytes"] / f["compressed_bytes"], 2),
        "accuracy_parent": acc.get("parent"), "accuracy_variant": acc.get("variant"),
        "accuracy_drop_points": acc.get("drop_points"),
        "deviation": {k: v for k, v in f["deviation"].items() if k != "inputs"},
        "latency_ms": {k: f["latency_ms"][k] for k in ("parent", "variant", "ratio")},
        "optimize_s": f["optimize_seconds"], "measure_and_optimize_s": round(built_s, 2),
    }


def _make(path: Path, fmt: str, recipes: list[Any], names: list[str], work: Path,
          **opts: Any) -> tuple[list[Any], float]:
    from deltafleet.server import optimize

    o = optimize.OptimizeOptions(tuple(recipes), max_accuracy_drop_points=1e9, **opts)
    t0 = time.perf_counter()
    made = optimize.make_variants(path, fmt, {}, o, work, names=names)
    return made, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resnet-int8-max-mb", type=float, default=26.0)
    p.add_argument("--resnet-pruned-max-mb", type=float, default=14.0)
    p.add_argument("--max-accuracy-drop", type=float, default=1.0)
    p.add_argument("--targets", type=Path, default=HERE / "targets.json")
    opts = p.parse_args()
    targets = (json.loads(opts.targets.read_text()).get("optimize", {})
               if opts.targets.exists() else {})
    from deltafleet.server.optimize import Recipe
    from tests.harness import modelgen

    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        root = Path(tmp)
        digits = modelgen.train_digits(seed=0)
        files = modelgen.save_digits_npz(root, digits)
        onnx = modelgen.make_digits_onnx(root / "digits.onnx", digits)
        tfl = modelgen.make_digits_tflite(root / "digits.tflite", digits)
        ev = {"eval": files["eval"]}
        for recipes, names, extra in (
                ([Recipe("int8"), Recipe("fp16"), Recipe("int8", 0.5)],
                 ["int8", "fp16", "int8-pruned50"], ev),
                ([Recipe("int8")], ["int8-static"], {**ev, "calibration": files["calibration"]})):
            made, took = _make(onnx, "onnx", recipes, names, root / names[0], **extra)
            rows += [_row("digits-mlp.onnx", m, took / len(made)) for m in made]
        made, took = _make(tfl, "tflite", [Recipe("int8")], ["tflite-int8"], root / "tfl",
                           calibration=files["calibration"], **ev)
        rows += [_row("digits-mlp.tflite", m, took) for m in made]
        for r in rows:
            if r["variant"] in ("int8", "int8-static", "tflite-int8") and (
                    r["accuracy_drop_points"] is None
                    or r["accuracy_drop_points"] > opts.max_accuracy_drop):
                failures.append(f"{r['model']} {r['variant']}: accuracy drop "
                                f"{r['accuracy_drop_points']} > {opts.max_accuracy_drop} points")
        resnet: dict[str, Any] = {"skipped": os.environ.get("BENCH_QUICK") == "1"}
        if not resnet["skipped"]:
            t0 = time.perf_counter()
            path = modelgen.make_resnet50_onnx(root / "resnet50.onnx", seed=0)
            resnet["generate_s"] = round(time.perf_counter() - t0, 1)
            resnet["fp32_bytes"] = path.stat().st_size
            made, took = _make(path, "onnx", [Recipe("int8"), Recipe("int8", 0.5)],
                               ["int8", "int8-pruned50"], root / "resnet")
            rr = [_row("resnet50.onnx", m, took / 2) for m in made]
            rows += rr
            int8, pruned = rr
            resnet["int8_bytes"] = int8["size_bytes"]
            resnet["int8_pruned50_zstd_bytes"] = pruned["compressed_bytes"]
            if int8["size_bytes"] > opts.resnet_int8_max_mb * MB:
                failures.append(f"resnet50 int8 is {int8['size_bytes'] / MB:.2f} MB > "
                                f"{opts.resnet_int8_max_mb} MB")
            if pruned["compressed_bytes"] > opts.resnet_pruned_max_mb * MB:
                failures.append(f"resnet50 int8 + 50% pruning + zstd is "
                                f"{pruned['compressed_bytes'] / MB:.2f} MB > "
                                f"{opts.resnet_pruned_max_mb} MB")
    met = {}
    for r in rows:
        lat_max = targets.get("latency_ratio_max")
        if lat_max is not None and r["latency_ms"]["ratio"] is not None:
            met[f"{r['model']} {r['variant']} latency"] = r["latency_ms"]["ratio"] <= lat_max
    doc = {"ok": not failures, "failures": failures, "results": rows, "resnet50": resnet,
           "checks": {"resnet_int8_max_mb": opts.resnet_int8_max_mb,
                      "resnet_pruned_max_mb": opts.resnet_pruned_max_mb,
                      "max_accuracy_drop_points": opts.max_accuracy_drop},
           "targets": {"met": all(met.values()) if met else None, "detail": met}}
    print(json.dumps(doc, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
