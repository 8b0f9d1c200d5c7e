"""How long hardware-aware selection takes over a large mixed fleet, and whether every device
type gets the variant a brute-force check says is best.

    .venv/bin/python -m scripts.bench.selection [--types 240] [--devices 10000] [--runs 3]

``rollout plan``'s selection step (``server.selection.plan_fleet``: constraints, accuracy
budget, objective, per-type summary) over ``--devices`` devices of ``--types`` generated types
(``tests/harness/devicetypes.py``), for each objective; the time is the median of ``--runs``.
The brute force enumerates every variant per type with its own copy of the rules (written
from the docs, not by calling the module) and must agree on every type. Prints one JSON
document; a disagreement fails it (``"ok": false``). Target (``targets.json``, key
``selection``): ``plan_s_max`` per objective. ``BENCH_QUICK=1``: 2,000 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from deltafleet.server.selection import Objective, plan_fleet
from tests.harness.devicetypes import VARIANTS, DeviceType, baselines, device_types, type_figures

HERE = Path(__file__).resolve().parent
OPSET = {"1.16": 19, "1.17": 20, "1.18": 21, "1.20": 21, "1.22": 22}
PRECISION = {"fp32": 3, "fp16": 2, "int8": 1}


def brute_force(t: DeviceType, objective: Objective) -> str | None:
    """The best variant for a device of type ``t`` (memory free: 60%, disk 4 GiB)."""
    free = int(t.memory_bytes * 0.6 * 0.75)
    fits = []
    for v in VARIANTS:
        rt = (t.runtimes.get("onnxruntime") if v.format == "onnx"
              else t.runtimes.get("tflite-runtime"))
        if rt is None:
            continue
        minor = ".".join(rt.split(".")[:2])
        if v.min_runtime_version and tuple(map(int, minor.split("."))) < tuple(
                map(int, v.min_runtime_version.split("."))):
            continue
        if v.opset is not None and v.format == "onnx" and v.opset > OPSET[minor]:
            continue
        if v.accelerator and v.accelerator != t.accelerator:
            continue
        need = (type_figures(t, v).model_rss_bytes if t.has_baseline
                else max(8 << 20, v.size_bytes * 2))
        if need is not None and need > free:
            continue
        fits.append(v)
    if not fits:
        return None
    if objective.kind != "accuracy" and objective.accuracy_budget is not None:
        top = max(v.accuracy or 0 for v in fits)
        fits = [v for v in fits if (v.accuracy or 0) >= top - objective.accuracy_budget]
    best = None
    for v in fits:
        if objective.kind == "latency":
            score: float = type_figures(t, v).p50_us if t.has_baseline else v.size_bytes
        elif objective.kind == "size":
            score = v.size_bytes
        else:
            score = -(v.accuracy if v.accuracy is not None else PRECISION[v.precision])
        key = (score, v.size_bytes, v.name)
        if best is None or key < best[0]:
            best = (key, v.name)
    return best[1] if best else None


def main() -> int:
    quick = os.environ.get("BENCH_QUICK") == "1"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", type=int, default=240)
    p.add_argument("--devices", type=int, default=2000 if quick else 10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--targets", type=Path, default=HERE / "targets.json")
    opts = p.parse_args()
    if opts.types < 1 or opts.devices < opts.types or opts.runs < 1:
        print("selection: need --types >= 1, --devices >= --types, --runs >= 1", file=sys.stderr)
        return 2
    targets = (json.loads(opts.targets.read_text()).get("selection", {})
               if opts.targets.exists() else {})
    types = device_types(opts.types)
    by_name = {t.name: t for t in types}
    devices = [types[i % len(types)].facts(f"dev-{i:05d}") for i in range(opts.devices)]
    base = baselines(types)
    results: dict[str, dict] = {}
    failures: list[str] = []
    for objective in (Objective("latency"), Objective("size"), Objective("accuracy"),
                      Objective("latency", accuracy_budget=0.01)):
        label = objective.kind + ("" if objective.accuracy_budget is None
                                  else f"@{objective.accuracy_budget}")
        took = []
        plans = []
        for _ in range(opts.runs):
            t0 = time.perf_counter()
            _, plans = plan_fleet(devices, VARIANTS, objective, None, base)
            took.append(time.perf_counter() - t0)
        wrong = [f"{tp.device_type}: {tp.variant} != {brute_force(by_name[tp.device_type], objective)}"
                 for tp in plans if tp.variant != brute_force(by_name[tp.device_type], objective)]
        failures += [f"{label}: {w}" for w in wrong[:5]]
        chosen: dict[str, int] = {}
        for tp in plans:
            chosen[str(tp.variant)] = chosen.get(str(tp.variant), 0) + 1
        results[label] = {"plan_s": round(statistics.median(took), 4),
                          "plan_s_runs": [round(x, 4) for x in took],
                          "types_checked": len(plans), "types_wrong": len(wrong),
                          "types_per_variant": chosen}
    limit = targets.get("plan_s_max")
    met = None if limit is None else all(r["plan_s"] <= limit for r in results.values())
    doc = {"ok": not failures, "failures": failures, "types": len(types),
           "devices": len(devices), "variants": len(VARIANTS), "objectives": results,
           "targets": {"plan_s_max": limit, "met": met}}
    print(json.dumps(doc, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
