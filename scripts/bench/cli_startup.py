"""How long fleetctl takes to start: ``fleetctl --help`` and ``fleetctl device list`` (on a
fresh home made with ``fleetctl init``) against ``python -c pass``, medians of N runs each, in
one run (so a busy machine slows all of them alike and the figures stay comparable).

``device_list_api`` is ``fleetctl device list`` through the management API: the bench starts
``fleetctl server --api-listen`` on that home (no broker needed; it keeps retrying one) with a
viewer token, and runs the command with ``FLEET_API_URL`` set and no access to the home.

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
import signal
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(fleetctl: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``fleetctl server --api-listen`` on a free port, and the client's environment for it."""
    made = subprocess.run([*fleetctl, "token", "create", "bench", "--role", "viewer", "--json"],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    if made.returncode != 0:
        raise RuntimeError(f"fleetctl token create exited {made.returncode}: {made.stderr}")
    port = free_port()
    server_env = {**env, "FLEET_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}"}
    proc = subprocess.Popen([*fleetctl, "server", "--api-listen", f"127.0.0.1:{port}"],
                            env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError("fleetctl server --api-listen did not listen") from None
            time.sleep(0.2)
    client_env = {k: v for k, v in env.items() if not k.startswith("FLEET_")}
    client_env.update({"FLEET_API_URL": f"http://127.0.0.1:{port}",
                       "FLEET_API_TOKEN": json.loads(made.stdout)["token"]})
    return proc, client_env


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


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
            "device_list_api": [*fleetctl, "device", "list"],
        }
        envs = dict.fromkeys(commands, env)
        server = None
        try:
            server, envs["device_list_api"] = start_api(fleetctl, env)
        except RuntimeError as e:
            failures.append(str(e))
            del commands["device_list_api"]
        medians: dict[str, float] = {}
        samples: dict[str, list[float]] = {}
        try:
            for _round in range(opts.runs):  # interleaved: load drifts hit every command alike
                for name, argv in commands.items():
                    took, error = time_runs(argv, envs[name], 1)
                    samples.setdefault(name, []).extend(took)
                    if error:
                        failures.append(error)
        finally:
            if server is not None:
                stop(server)
        for name, xs in samples.items():
            medians[name] = round(statistics.median(xs), 4)
    checks = {"help_s_max": "help", "device_list_s_max": "device_list",
              "device_list_api_s_max": "device_list_api"}
    met = {key: medians.get(name, float("inf")) <= limit
           for key, name in checks.items() if (limit := targets.get(key)) is not None}
    doc = {
        "ok": not failures,
        "failures": sorted(set(failures)),
        "runs": opts.runs,
        "command": {k: ("FLEET_API_URL=... " if k.endswith("_api") else "") + " ".join(v)
                    for k, v in commands.items()},
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
