"""`make bench`: run every benchmark in scripts/bench/, each printing one JSON document.

Each runs as a module from the repository root (``python -m scripts.bench.<name>``), so it
imports the test harness as ``tests.harness``. Sizes come from each benchmark's environment
fallbacks (``BENCH_QUICK=1`` for the small smoke configuration; ``BENCH_DEVICES=500,1000``,
``BENCH_HEARTBEAT_DEVICES``, ``BENCH_ARTIFACT_MB`` for fleet_scale; ``BENCH_RUNS``,
``BENCH_RATE``, ``BENCH_MODEL_MB`` for hot_swap; selection takes ``BENCH_QUICK`` only (2,000
devices instead of 10,000); see each module's docstring).

Results are written to bench-results/<name>.json -- also for a failed run, whose JSON says what
failed -- and summarised on stdout. A benchmark fails when it exits non-zero, prints no JSON or
says ``"ok": false``; ``run_all`` then exits 1. Missed targets (``targets.json``) are shown but
do not fail the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = REPO / "bench-results"


def _targets_line(doc: object) -> str:
    t = doc.get("targets") if isinstance(doc, dict) else None
    if not isinstance(t, dict):
        return ""
    met = t.get("all_met", t.get("met"))
    return {True: ", targets met", False: ", TARGETS MISSED", None: ", targets undecided"}[met]


def main() -> int:
    OUT.mkdir(exist_ok=True)
    only = set(sys.argv[1:])
    failed = 0
    for script in sorted(HERE.glob("*.py")):
        if script.name in ("run_all.py", "__init__.py") or (only and script.stem not in only):
            continue
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", f"scripts.bench.{script.stem}"],
                             capture_output=True, text=True, cwd=REPO)
        took = time.monotonic() - t0
        try:
            doc = json.loads(res.stdout)
        except json.JSONDecodeError:
            doc = None
        if doc is not None:
            (OUT / f"{script.stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
        ok = res.returncode == 0 and doc is not None and not (
            isinstance(doc, dict) and doc.get("ok") is False)
        if not ok:
            failed += 1
            why = ("did not print JSON" if doc is None else
                   "; ".join(doc.get("failures", [])[:5]) if isinstance(doc, dict) else "")
            print(f"{script.stem}: FAILED in {took:.0f} s (exit {res.returncode}): {why}\n"
                  f"{res.stderr[-2000:]}", file=sys.stderr)
            continue
        print(f"{script.stem}: ok in {took:.0f} s{_targets_line(doc)} -> "
              f"{OUT / (script.stem + '.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
