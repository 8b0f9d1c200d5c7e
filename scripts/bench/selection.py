"""How long hardware-aware selection takes over a large mixed fleet, and whether every device
type gets the variant a brute-force check says is best.

    .venv/bin/python -m scripts.bench.selection [--types 240] [--devices 10000] [--runs 3]

``rollout plan``'s selection step (``server.selection.plan_fleet``: constraints, accuracy
budget, objective, per-type summary) over ``--devices`` devices of ``--types`` generated types
(``tests/harness/devicetypes.py``), for each objective; the time is the median of ``--runs``.
The brute force enumerates every variant per type with its own copy of the rules (written
from the docs, not by calling the module) and must agree on every type. Prints one JSON
document; a disagreement fails it (``"ok": false``). Target (``targets.json``, key
``selection``): ``plan_s_max`` per objective. ``store_plan``: the same fleet in a SQLite store
(portraits, 10 devices per type measured) and the real command, ``fleetctl rollout plan
--prefer latency`` (``--json`` and the table), timed as whole processes (target
``cli_plan_s_max``); each run must list every device and type and give each type the variant
``store_brute_force`` derives, else ``"ok": false``; ``--no-store`` skips it.
``BENCH_QUICK=1``: 2,000 devices.
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


def store_brute_force(t: DeviceType, sizes: dict[str, int]) -> str | None:
    """The store's answer for type ``t`` by latency, recomputed by hand: the two stored ONNX
    variants (``default`` measured as VARIANTS[0], ``int8`` as VARIANTS[1]), an ONNX Runtime
    needed, the measured memory within 75% of the half of memory the portraits say is free,
    lowest p50, ties to the smaller file."""
    if "onnxruntime" not in t.runtimes:
        return None
    free = t.memory_bytes // 2
    best = None
    for name, v in (("default", VARIANTS[0]), ("int8", VARIANTS[1])):
        f = type_figures(t, v)
        if (f.model_rss_bytes or 0) > free * 0.75:
            continue
        key = (f.p50_us, sizes[name], name)
        if best is None or key < best[0]:
            best = (key, name)
    return best[1] if best else None


def store_plan(types: list[DeviceType], devices: int, runs: int) -> dict:
    """The real command over a SQLite store of ``devices`` devices, each with a portrait, 10
    measured per type: ``fleetctl rollout plan detector:v1 --group all --prefer latency``
    (``--json`` and the table), wall time of the whole process, median of ``runs``. Each run
    must list every device and type, and each type's variant must be the one
    ``store_brute_force`` derives; ``plan_rollout`` in-process with and without ``--prefer``
    is reported beside."""
    import subprocess
    import tempfile
    from datetime import UTC, datetime

    from deltafleet.server import catalog, fleet
    from deltafleet.server.fleet import portraits as fp
    from deltafleet.server.rollouts import plan_rollout
    from deltafleet.server.store import BlobStore, Store, upgrade
    from deltafleet.shared import Hello
    from deltafleet.shared.messages import BenchResult, Portrait
    from tests.harness.modelgen import make_int8_variant, make_onnx_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root}/fleet.db"
        upgrade(url)
        store, blobs = Store(url), BlobStore(root / "blobs")
        fp32 = make_onnx_model(root / "fp32.onnx", size_mb=1)
        int8 = make_int8_variant(fp32, root / "int8.onnx")
        now = datetime.now(UTC)
        with store.session() as s:
            catalog.add_model_version(s, blobs, "detector", "v1", fp32)
            catalog.add_model_version(s, blobs, "detector", "v1", int8, variant="int8",
                                      precision="int8")
            fleet.create_group(s, "all", {"site": "bench"})
            hellos = [Hello(f"d{i:05d}", "1", {"arch": t.arch, "cpu": t.cpu,
                                               "memory_bytes": t.memory_bytes,
                                               "runtimes": t.runtimes},
                            {"site": "bench", "device-type": t.name}, ())
                      for i in range(devices) for t in [types[i % len(types)]]]
            for j in range(0, devices, 1000):
                fleet.upsert_devices_from_hellos(s, hellos[j:j + 1000], now)
            fp.record_portraits(s, [Portrait(h.device_id, {"memory": {
                "available_bytes": h.profile["memory_bytes"] // 2}}) for h in hellos], now)
            options = catalog.variant_options(s, catalog.resolve_version(s, "detector:v1").id)
            sizes = {o.name: o.size_bytes for o in options}
            results = []
            for i, h in enumerate(hellos[:10 * len(types)]):
                t = types[i % len(types)]
                for o, v in zip(options, VARIANTS[:2], strict=False):
                    f = type_figures(t, v)
                    results.append(BenchResult(f"r{i}{o.name}", h.device_id, "r", o.name,
                                               o.sha256, "onnxruntime", "1",
                                               {"p50_us": f.p50_us, "p95_us": f.p95_us,
                                                "model_rss_bytes": f.model_rss_bytes or 0,
                                                "runs": 5}))
            fp.record_bench_results(s, results, now)
        out: dict = {}
        for label, prefer in (("in_process_without_prefer_s", None),
                              ("in_process_prefer_latency_s", "latency")):
            took = []
            for _ in range(runs):
                with store.read() as s:
                    t0 = time.perf_counter()
                    plan_rollout(s, "detector:v1", "all", prefer=prefer)
                    took.append(time.perf_counter() - t0)
            out[label] = round(statistics.median(took), 3)
        store.dispose()
        env = {**os.environ, "FLEET_HOME": str(root), "FLEET_DB_URL": url, "COLUMNS": "100"}
        env.pop("FLEET_API_URL", None)
        fleetctl = str(Path(sys.executable).with_name("fleetctl"))
        argv = [fleetctl, "rollout", "plan", "detector:v1", "--group", "all", "--prefer",
                "latency"]
        by_name = {t.name: t for t in types}
        failures: list[str] = []
        for label, extra in (("cli_json_s", ["--json"]), ("cli_table_s", [])):
            took = []
            for _ in range(runs):
                t0 = time.perf_counter()
                done = subprocess.run(argv + extra, env=env, capture_output=True, text=True,
                                      check=False)
                took.append(time.perf_counter() - t0)
                if done.returncode != 0:
                    failures.append(f"{label}: exit {done.returncode}: "
                                    f"{done.stderr.strip()[-200:]}")
                    continue
                if extra:
                    plan = json.loads(done.stdout)
                    if len(plan["devices"]) != devices:
                        failures.append(f"{label}: {len(plan['devices'])} of {devices} devices")
                    if len(plan["device_types"]) != len(types):
                        failures.append(f"{label}: {len(plan['device_types'])} of "
                                        f"{len(types)} types")
                    failures += [f"{label}: {p['device_type']}: {p['variant']} != {want}"
                                 for p in plan["device_types"]
                                 if p["variant"] != (want := store_brute_force(
                                     by_name[p["device_type"]], sizes))][:5]
                elif f"{devices} devices" not in done.stdout:
                    failures.append(f"{label}: the summary line is missing")
            out[label] = round(statistics.median(took), 3)
            out[label + "_runs"] = [round(x, 3) for x in took]
        out["failures"] = failures
        return out


def main() -> int:
    quick = os.environ.get("BENCH_QUICK") == "1"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", type=int, default=240)
    p.add_argument("--devices", type=int, default=2000 if quick else 10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--targets", type=Path, default=HERE / "targets.json")
    p.add_argument("--no-store", action="store_true",
                   help="skip timing rollout plan --prefer through a SQLite store")
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
           "store_plan": None if opts.no_store else store_plan(types, len(devices), opts.runs),
           "targets": {"plan_s_max": limit, "met": met}}
    cli_limit = targets.get("cli_plan_s_max")
    if doc["store_plan"] is not None:
        failures += doc["store_plan"]["failures"]
        doc["ok"] = not failures
        doc["targets"]["cli_plan_s_max"] = cli_limit
        doc["targets"]["cli_met"] = None if cli_limit is None else all(
            doc["store_plan"][k] <= cli_limit for k in ("cli_json_s", "cli_table_s"))
    print(json.dumps(doc, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
