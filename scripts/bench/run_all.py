"""`make bench`: run every benchmark in scripts/bench/, each printing one JSON document.

Each runs as a module from the repository root (``python -m scripts.bench.<name>``), so it
imports the test harness as ``tests.harness``.

Results are written to bench-results/<name>.json and summarised on stdout. A benchmark may read
BENCH_QUICK=1 to run a smaller configuration (used to smoke-test the scripts).
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
        if res.returncode != 0:
            failed += 1
            print(f"{script.stem}: FAILED in {took:.0f} s\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        try:
            doc = json.loads(res.stdout)
        except json.JSONDecodeError:
            failed += 1
            print(f"{script.stem}: did not print JSON", file=sys.stderr)
            continue
        (OUT / f"{script.stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(f"{script.stem}: ok in {took:.0f} s -> {OUT / (script.stem + '.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
