"""`make demo`: a model update reaching real agents as a verified delta over MQTT.

Starts a broker (Mosquitto if installed, else embedded amqtt; or FLEET_MQTT_URL), a server with
SQLite in a temp home, and three agents as separate processes (jetson-1, jetson-2, rpi-1). Rolls
v1 to the whole fleet (full artifact: the model zstd-compressed), then v2 (last layer retrained)
to `--group jetson` (delta), makes an INT8 variant of v2 (`model optimize`) and shows the
variant each device type would get and why (`rollout plan --prefer size`), waits until the
server has had one device per type benchmark the new variant on its own (FLEET_AUTO_BENCH_S)
and plans again by measured latency (`--prefer latency`), prints what each device runs and,
per rollout, the bytes sent against the model's own size, where the server and agents serve
their Prometheus metrics, and where the management API and web console are.
Leaves no process behind.

The demo is a list of named steps. When one fails it prints one line on stderr and exits 1::

    demo failed at step "start 3 agents": agent jetson-1 exited 2: error: trusted key ...

(which step, which device or command, the cause); ``--logs`` adds the tails of the server's
and agents' logs. ``--trusted-key FILE`` gives the agents FILE instead of the server's
signing.pub, to see what a misconfigured device says.

Run from the repository root as a module: ``python -m scripts.demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from deltafleet.agent.client import AgentClient
from deltafleet.shared import one_line
from tests.harness.fleetlab import Lab, free_port
from tests.harness.modelgen import make_onnx_pair

DEVICES = {"jetson-1": "jetson", "jetson-2": "jetson", "rpi-1": "rpi"}
ONLINE_TIMEOUT_S = 30.0


class DemoFailed(Exception):
    """A step of the demo failed; ``str()`` is the one line the demo prints."""

    def __init__(self, step: str, cause: str) -> None:
        super().__init__(f'demo failed at step "{step}": {cause}')
        self.step, self.cause = step, cause


@contextmanager
def step(name: str) -> Iterator[None]:
    """Run a step; any error in it becomes a DemoFailed naming the step and the cause."""
    try:
        yield
    except DemoFailed:
        raise
    except Exception as e:  # noqa: BLE001 - reported as one line, the cause kept
        raise DemoFailed(name, one_line(e, limit=400) or type(e).__name__) from e


_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


def last_problem(log: str) -> str | None:
    """The last line of a process log that says what went wrong (an ``error:`` line, an
    ERROR or WARNING record), else its last line; without the log's time stamp."""
    lines = [x.strip() for x in log.splitlines() if x.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or " ERROR " in line or " WARNING " in line:
            return _STAMP.sub("", line)
    return _STAMP.sub("", lines[-1]) if lines else None


def process_failure(lab: Lab, name: str) -> str | None:
    """``<name> exited N: <its last problem>`` if the process ``name`` has ended, else None."""
    proc = lab.procs.get(name)
    if proc is None or proc.poll() is None:
        return None
    problem = last_problem(lab.log(name))
    return f"{name.replace('-', ' ', 1)} exited {proc.returncode}" + (
        f": {problem}" if problem else "")


def online(lab: Lab) -> set[str]:
    """Devices the server has marked online (read from its database: polling through
    `fleetctl device list` would pay the CLI's start-up on every poll)."""
    from deltafleet.server import fleet
    from deltafleet.server.store import Store

    store = Store(lab.env.get("FLEET_DB_URL") or f"sqlite:///{lab.home}/fleet.db")
    try:
        with store.session() as s:
            return {d.id for d in fleet.list_devices(s) if d.online}
    finally:
        store.dispose()


def wait_online(lab: Lab, devices: list[str], timeout_s: float = ONLINE_TIMEOUT_S) -> None:
    """Until the server marks every device online; fails fast, naming the process, when the
    server or an agent exits, and names the devices still offline (and what their agent last
    said) when the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        for name in ("server", *(f"agent-{d}" for d in devices)):
            failure = process_failure(lab, name)
            if failure:
                raise RuntimeError(failure)
        missing = [d for d in devices if d not in online(lab)]
        if not missing:
            return
        if time.monotonic() > deadline:
            said = last_problem(lab.log(f"agent-{missing[0]}"))
            raise RuntimeError(f"{', '.join(missing)} not online after {timeout_s:.0f} s"
                               + (f"; agent {missing[0]} last said: {said}" if said else ""))
        time.sleep(0.2)


def rollout(lab: Lab, version: str, group: str) -> dict[str, Any]:
    """Roll ``version`` out to ``group``, wait for it, and print what it sent: a full artifact
    is the model zstd-compressed (smaller than the model), a delta far smaller still.
    Raises (one line) when the rollout does not complete: its state and each device not
    healthy with its reason."""
    args = ("rollout", "model", version, "--group", group, "--wait", "--timeout", "60",
            "--health-window", "1s", "--json")
    res = lab.fleetctl(*args, echo=True, check=False)
    try:
        status = json.loads(res.stdout)
    except ValueError:
        raise RuntimeError(f"fleetctl {' '.join(args[:5])} exited {res.returncode}: "
                           f"{res.stderr.strip() or 'no output'}") from None
    if status["state"] != "completed":
        stuck = [f"{t['device']} {t['state']}" + (f" ({t['reason']})" if t["reason"] else "")
                 for t in status["targets"] if t["state"] != "healthy"]
        raise RuntimeError(f"rollout {status['id']} of {version} to {group} ended "
                           f"{status['state']}" + (f": {status['state_reason']}"
                                                   if status.get("state_reason") else "")
                           + (f"; {', '.join(stuck)}" if stuck else ""))
    kinds = sorted({t["artifact"] for t in status["targets"] if t["artifact"]})
    print(f"rollout {status['id']}: {status['state']}; sent {' and '.join(kinds) or 'no'} "
          f"artifacts, {status['bytes_sent']:,} bytes for {status['full_bytes']:,} bytes of model "
          f"({100 * status['bytes_sent'] / max(1, status['full_bytes']):.1f}%)")
    return status


def sent(target: dict[str, Any] | None) -> str:
    return f"{target['bytes_sent']:,} ({target['artifact']})" if target else "-"


def running(lab: Lab, device_id: str) -> dict[str, Any]:
    models = lab.agent_status(device_id)
    if not models:
        raise RuntimeError(f"fleet-agent status on {device_id} shows no model")
    return models[0]


def metric_lines(url: str, *names: str) -> list[str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return [line for line in text.splitlines()
            if line.split("{")[0].split(" ")[0] in names and not line.endswith(" 0.0")]


def print_metrics(lab: Lab, metrics_port: int) -> None:
    """Where the metrics are, and a few of them (docs/observability.md lists them all)."""
    server = f"http://127.0.0.1:{metrics_port}/metrics"
    print(f"\nmetrics: server {server} (fleetctl server --metrics-listen / FLEET_METRICS_LISTEN)")
    for line in metric_lines(server, "deltafleet_devices", "deltafleet_device_models",
                             "deltafleet_published_bytes_total"):
        print(f"  {line}")
    for device_id, port in lab.api_ports.items():
        print(f"metrics: {device_id} http://127.0.0.1:{port}/metrics (its local API port)")
    print("`make monitor` keeps this fleet running under a local Prometheus with the alert rules")


def print_console(lab: Lab, api_port: int) -> None:
    """Where the management API and the web console are, and a token to log in with."""
    import urllib.request

    base = f"http://127.0.0.1:{api_port}"
    with urllib.request.urlopen(f"{base}/api/v1/health", timeout=5) as r:
        if r.status != 200:
            raise RuntimeError(f"GET {base}/api/v1/health answered {r.status}")
    lab.fleetctl("token", "create", "demo-viewer", "--role", "viewer", echo=True)
    print(f"console: {base}/ and API {base}/api/v1 (OpenAPI at /api/v1/openapi.json; "
          f"log in with a token from `fleetctl token create NAME --role viewer|operator|admin`)")


def wait_auto_bench(lab: Lab, variant: str, timeout_s: float = 60.0) -> None:
    """Until every device type has a baseline for ``variant`` (the server asked one device
    per type on its own, FLEET_AUTO_BENCH_S)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        types = json.loads(lab.fleetctl("profile", "list", "--json").stdout)
        if types and all(variant in t["variants_auto"] for t in types):
            return
        time.sleep(1.0)
    raise RuntimeError(f"not every device type benchmarked variant {variant} within "
                       f"{timeout_s:.0f} s")


def run(lab: Lab, tmp: Path, trusted_key: Path | None = None) -> None:
    """The demo's steps; raises DemoFailed."""
    t0 = time.monotonic()
    with step("start the broker"):
        if lab.mqtt_url is None:
            lab.start_broker()
            print(f"broker: {lab.broker_kind} at {lab.mqtt_url}")
        else:
            print(f"broker: {lab.mqtt_url} (FLEET_MQTT_URL)")
    with step("fleetctl init"):
        lab.fleetctl("init", echo=True)
    with step("register models v1 and v2"):
        v1, v2 = make_onnx_pair(tmp / "models", size_mb=4.0)
        print(f"generated detector v1 and v2 (last layer retrained), "
              f"{v1.stat().st_size / 1e6:.1f} MB each")
        for version, path in (("v1", v1), ("v2", v2)):  # prints what full installs ship
            print(lab.fleetctl("model", "add", "detector", version, str(path),
                               echo=True).stdout.strip())
    with step("create groups"):
        lab.fleetctl("group", "create", "fleet", "--match", "site=demo", echo=True)
        lab.fleetctl("group", "create", "jetson", "--match", "hw=jetson", echo=True)
    with step("start the server"):
        metrics_port, api_port = free_port(), free_port()
        lab.env["FLEET_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
        lab.env["FLEET_API_LISTEN"] = f"127.0.0.1:{api_port}"
        lab.env["FLEET_AUTO_BENCH_S"] = "2"  # new variants measured on one device per type
        lab.start_server()
    with step(f"start {len(DEVICES)} agents"):
        for device_id, hw in DEVICES.items():
            lab.start_agent(device_id, {"hw": hw, "site": "demo", "device-type": f"{hw}-board"},
                            trusted_key=trusted_key,
                            extra_env={"FLEET_AGENT_TELEMETRY_S": "2"})
        wait_online(lab, list(DEVICES))
        print(f"agents online: {', '.join(DEVICES)}")

    with step("roll v1 out to group fleet"):
        first = rollout(lab, "v1", "fleet")
    with step("roll v2 out to group jetson"):
        status = rollout(lab, "v2", "jetson")
    with step("check what each device runs"):
        print(f"\n{'device':<10} {'group':<7} {'runs':<5} {'sha256':<14} "
              f"{'v1 bytes sent':>20} {'v2 bytes sent':>18} {'model size':>11}")
        v1_sent = {t["device"]: t for t in first["targets"]}
        v2_sent = {t["device"]: t for t in status["targets"]}
        for device_id, hw in DEVICES.items():
            runs = running(lab, device_id)
            t1, t2 = v1_sent.get(device_id), v2_sent.get(device_id)
            model_size = (t2 or t1 or {}).get("full_bytes")
            print(f"{device_id:<10} {hw:<7} {runs['version']:<5} "
                  f"{runs['sha256'][:12]:<14} {sent(t1):>20} {sent(t2):>18} "
                  f"{model_size or 0:>11,}")
            expected = "v2" if hw == "jetson" else "v1"
            if runs["version"] != expected:
                raise RuntimeError(f"{device_id} runs {runs['version']}, expected {expected}")
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    for device_id in DEVICES:
        with step(f"ask {device_id}'s local inference API"):
            with AgentClient(port=lab.api_ports[device_id]) as client:
                answer = client.predict("detector", x)
            print(f"{device_id}: local inference API answered with detector "
                  f"{answer.version}{' (fallback)' if answer.fallback else ''}")
    with step("make an INT8 variant of v2 and plan by device type"):
        print(lab.fleetctl("model", "optimize", "detector:v2", "--int8", echo=True).stdout.strip())
        print(lab.fleetctl("rollout", "plan", "detector:v2", "--group", "fleet", "--prefer",
                           "size", echo=True).stdout.rstrip())
    with step("wait for the devices to benchmark the new variants by themselves"):
        wait_auto_bench(lab, "int8")
        print(lab.fleetctl("profile", "list", echo=True).stdout.rstrip())
        print(lab.fleetctl("rollout", "plan", "detector:v2", "--group", "fleet", "--prefer",
                           "latency", echo=True).stdout.rstrip())
    with step("read the metrics"):
        print_metrics(lab, metrics_port)
    with step("check the management API and console"):
        print_console(lab, api_port)
    print(f"\nOK: demo finished in {time.monotonic() - t0:.1f} s")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n")[0])
    p.add_argument("--trusted-key", type=Path, metavar="FILE",
                   help="give the agents FILE instead of the server's signing.pub "
                        "(see what a misconfigured device says)")
    p.add_argument("--logs", action="store_true",
                   help="on failure, also print the tails of the server's and agents' logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with tempfile.TemporaryDirectory(prefix="deltafleet-demo-") as tmp:
        lab = Lab(Path(tmp), mqtt_url=os.environ.get("FLEET_MQTT_URL"))
        lab.env.setdefault("COLUMNS", "120")
        try:
            run(lab, Path(tmp), args.trusted_key)
            return 0
        except DemoFailed as e:
            print(e, file=sys.stderr, flush=True)
            if args.logs:
                for name in ("server", *(f"agent-{d}" for d in DEVICES)):
                    tail = lab.log(name).splitlines()[-15:]
                    if tail:
                        print(f"--- {name} log (tail) ---", *tail, sep="\n", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("demo interrupted", file=sys.stderr)
            return 130
        finally:
            lab.close()


if __name__ == "__main__":
    sys.exit(main())
