"""How long fleetctl takes to start: ``fleetctl --help`` and ``fleetctl device list`` (on a
fresh home made with ``fleetctl init``) against ``python -c pass``, medians of N runs each, in
one run (so a busy machine slows all three alike and the figures stay comparable).

    .venv/bin/python -m scripts.bench.cli_startup [--runs 7] [--targets scripts/bench/targets.json]

Prints one JSON document. Any command that exits non-zero fails the benchmark (``"ok":
false``). Targets (``targets.json``, key ``cli_startup``): the median of each fleetctl command
in seconds (``help_s_max``, ``device_list_s_max``); a missed target is reported under
``"targets"``, not failed. ``BENCH_QUICK=1`` runs 3 times. fleetctl is run as the installed
console script next to this interpreter, else as ``python -c 'from deltafleet.server.cli
import main; main()'``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def fleetctl_argv() -> list[str]:
    exe = Path(sys.executable).with_name("fleetctl")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from deltafleet.server.cli import main; main()"]


def time_runs(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], str | None]:
    """Wall seconds of each run; the first failure's message (None: all exited 0)."""
    took: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        res = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        took.append(time.perf_counter() - t0)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
            return took, f"{' '.join(argv[-2:])} exited {res.returncode}: {tail[0]}"
    return took, None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int,
                   default=3 if os.environ.get("BENCH_QUICK") == "1" else 7)
    p.add_argument("--targets", type=Path, default=HERE / "targets.json")
    opts = p.parse_args()
    targets = json.loads(opts.targets.read_text()).get("cli_startup", {}) \
        if opts.targets.exists() else {}
    fleetctl = fleetctl_argv()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as home:
        env = {**os.environ, "FLEET_HOME": str(Path(home) / "fleet"), "COLUMNS": "80"}
        env.pop("FLEET_DB_URL", None)
        init = subprocess.run([*fleetctl, "init"], env=env, capture_output=True, text=True,
                              cwd=REPO, timeout=300)
        if init.returncode != 0:
            failures.append(f"fleetctl init exited {init.returncode}: {init.stderr.strip()}")
        commands = {
            "python_pass": [sys.executable, "-c", "pass"],
            "help": [*fleetctl, "--help"],
            "device_list": [*fleetctl, "device", "list"],
        }
        medians: dict[str, float] = {}
        samples: dict[str, list[float]] = {}
        for _round in range(opts.runs):  # interleaved: load drifts hit every command alike
            for name, argv in commands.items():
                took, error = time_runs(argv, env, 1)
                samples.setdefault(name, []).extend(took)
                if error:
                    failures.append(error)
        for name, xs in samples.items():
            medians[name] = round(statistics.median(xs), 4)
    checks = {"help_s_max": "help", "device_list_s_max": "device_list"}
    met = {key: medians.get(name, float("inf")) <= limit
           for key, name in checks.items() if (limit := targets.get(key)) is not None}
    doc = {
        "ok": not failures,
        "failures": sorted(set(failures)),
        "runs": opts.runs,
        "command": {k: " ".join(v) for k, v in commands.items()},
        "median_s": medians,
        "over_python_s": {k: round(v - medians.get("python_pass", 0.0), 4)
                          for k, v in medians.items() if k != "python_pass"},
        "samples_s": {k: [round(x, 4) for x in v] for k, v in samples.items()},
        "targets": {**targets, "met": met, "all_met": all(met.values()) if met else None},
    }
    print(json.dumps(doc, indent=2))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
