"""Reconcile cost per tick in one process: CPU seconds of ``RolloutController.reconcile`` per
tick on a rollout whose targets are all in flight and none due (steady state), at each size.

    .venv/bin/python -m scripts.bench.reconcile_cost 500 2000 [--ticks 40]

Prints one JSON object: per size, the mean and p95 CPU ms per tick, statements per tick and the
time of the first tick (which dispatches every target). Exits 1 when the counters of a rollout
disagree with a recount of its targets, or when a steady tick sends anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import event

from deltafleet.server import catalog, fleet
from deltafleet.server.daemon import FleetServer
from deltafleet.server.policy import RolloutPolicy
from deltafleet.server.rollouts import create_rollout
from deltafleet.server.store.models import counts, recount, utcnow
from deltafleet.shared import Hello
from scripts.bench.offline_store import offline_store
from tests.harness.modelgen import make_onnx_pair


def measure(root: Path, size: int, ticks: int, model: Path) -> dict[str, object]:
    cfg, store, blobs = offline_store(root)
    hellos = [Hello(f"d{i:05d}", "1.0", {"runtimes": {"onnxruntime": "1.20"}}, {"hw": "x"}, ())
              for i in range(size)]
    with store.session() as s:
        catalog.add_model_version(s, blobs, "detector", "v2", model)
        fleet.upsert_devices_from_hellos(s, hellos, utcnow())
        fleet.create_group(s, "x", {"hw": "x"})
    with store.session() as s:
        rid = create_rollout(s, "detector:v2", "x", "bench",
                             policy=RolloutPolicy(state_timeout_s=3600)).id
    ctl = FleetServer(cfg, store).controller
    started = time.process_time()
    with store.session() as s:
        sent, _ = ctl.reconcile(s, utcnow())
    first_s = time.process_time() - started
    statements = [0]

    def count(*_args: object) -> None:
        statements[0] += 1

    event.listen(store.engine, "after_cursor_execute", count)
    cpu: list[float] = []
    for i in range(1, ticks + 1):
        started = time.process_time()
        with store.session() as s:
            publishes, _ = ctl.reconcile(s, utcnow() + timedelta(seconds=i))
        cpu.append(time.process_time() - started)
        if publishes:
            raise SystemExit(f"size {size}: a steady tick published {len(publishes)} manifests")
    event.remove(store.engine, "after_cursor_execute", count)
    with store.read() as s:
        kept, counted = counts(s, rid), recount(s, rid)
    store.dispose()
    if kept != counted:
        print(json.dumps({"size": size, "counters": str(kept), "recount": str(counted)}))
        raise SystemExit(1)
    cpu.sort()
    return {"targets": size, "dispatched_first_tick": len(sent), "first_tick_cpu_s": first_s,
            "ticks": ticks, "cpu_ms_per_tick_mean": 1000 * sum(cpu) / len(cpu),
            "cpu_ms_per_tick_p95": 1000 * cpu[int(0.95 * (len(cpu) - 1))],
            "statements_per_tick": statements[0] / ticks, "counters_equal_recount": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[500, 2000])
    ap.add_argument("--ticks", type=int, default=40)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = make_onnx_pair(Path(tmp) / "model", size_mb=0.2)
        results = [measure(Path(tmp) / f"n{size}", size, args.ticks, model)
                   for size in args.sizes]
    print(json.dumps({"bench": "reconcile_cost", "db": "sqlite", "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
