"""`make demo`: a model update reaching real agents as a verified delta over MQTT.

Starts a broker (Mosquitto if installed, else embedded amqtt; or FLEET_MQTT_URL), a server with
SQLite in a temp home, and three agents as separate processes (jetson-1, jetson-2, rpi-1). Rolls
v1 to the whole fleet (full artifact: the model zstd-compressed), then v2 (last layer retrained)
to `--group jetson` (delta), and prints what each device runs and, per rollout, the bytes sent
against the model's own size, and where the server and agents serve their Prometheus metrics.
Leaves no process behind (`make monitor` keeps the fleet running under a local Prometheus).

Run from the repository root as a module: ``python -m scripts.demo``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deltafleet.agent.client import AgentClient
from tests.harness.fleetlab import Lab, free_port, wait_for
from tests.harness.modelgen import make_onnx_pair

DEVICES = {"jetson-1": "jetson", "jetson-2": "jetson", "rpi-1": "rpi"}


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


def rollout(lab: Lab, version: str, group: str) -> dict:
    """Roll ``version`` out to ``group``, wait for it, and print what it sent: a full artifact
    is the model zstd-compressed (smaller than the model), a delta far smaller still."""
    res = lab.fleetctl("rollout", "model", version, "--group", group, "--wait", "--timeout",
                       "60", "--health-window", "1s", "--json", echo=True)
    status = json.loads(res.stdout)
    kinds = sorted({t["artifact"] for t in status["targets"] if t["artifact"]})
    print(f"rollout {status['id']}: {status['state']}; sent {' and '.join(kinds) or 'no'} "
          f"artifacts, {status['bytes_sent']:,} bytes for {status['full_bytes']:,} bytes of model "
          f"({100 * status['bytes_sent'] / max(1, status['full_bytes']):.1f}%)")
    return status


def sent(target: dict | None) -> str:
    return f"{target['bytes_sent']:,} ({target['artifact']})" if target else "-"


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


def main() -> int:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="deltafleet-demo-") as tmp:
        lab = Lab(Path(tmp), mqtt_url=os.environ.get("FLEET_MQTT_URL"))
        lab.env.setdefault("COLUMNS", "120")
        try:
            if lab.mqtt_url is None:
                lab.start_broker()
                print(f"broker: {lab.broker_kind} at {lab.mqtt_url}")
            else:
                print(f"broker: {lab.mqtt_url} (FLEET_MQTT_URL)")
            lab.fleetctl("init", echo=True)
            v1, v2 = make_onnx_pair(Path(tmp) / "models", size_mb=4.0)
            print(f"generated detector v1 and v2 (last layer retrained), "
                  f"{v1.stat().st_size / 1e6:.1f} MB each")
            for version, path in (("v1", v1), ("v2", v2)):  # prints what full installs ship
                print(lab.fleetctl("model", "add", "detector", version, str(path),
                                   echo=True).stdout.strip())
            lab.fleetctl("group", "create", "fleet", "--match", "site=demo", echo=True)
            lab.fleetctl("group", "create", "jetson", "--match", "hw=jetson", echo=True)
            metrics_port = free_port()
            lab.env["FLEET_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
            lab.start_server()
            for device_id, hw in DEVICES.items():
                lab.start_agent(device_id, {"hw": hw, "site": "demo"},
                                extra_env={"FLEET_AGENT_TELEMETRY_S": "2"})
            wait_for(lambda: online(lab) >= set(DEVICES), 30, "3 agents online")
            print(f"agents online: {', '.join(DEVICES)}")

            first = rollout(lab, "v1", "fleet")
            status = rollout(lab, "v2", "jetson")
            print(f"\n{'device':<10} {'group':<7} {'runs':<5} {'sha256':<14} "
                  f"{'v1 bytes sent':>20} {'v2 bytes sent':>18} {'model size':>11}")
            v1_sent = {t["device"]: t for t in first["targets"]}
            v2_sent = {t["device"]: t for t in status["targets"]}
            for device_id, hw in DEVICES.items():
                running = lab.agent_status(device_id)[0]
                t1, t2 = v1_sent.get(device_id), v2_sent.get(device_id)
                model_size = (t2 or t1 or {}).get("full_bytes")
                print(f"{device_id:<10} {hw:<7} {running['version']:<5} "
                      f"{running['sha256'][:12]:<14} {sent(t1):>20} {sent(t2):>18} "
                      f"{model_size or 0:>11,}")
            x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
            for device_id in DEVICES:
                with AgentClient(port=lab.api_ports[device_id]) as client:
                    answer = client.predict("detector", x)
                print(f"{device_id}: local inference API answered with detector "
                      f"{answer.version}{' (fallback)' if answer.fallback else ''}")
            print_metrics(lab, metrics_port)
            ok = (first["state"] == status["state"] == "completed"
                  and lab.agent_status("rpi-1")[0]["version"] == "v1")
            print(f"\n{'OK' if ok else 'FAILED'}: demo finished in {time.monotonic() - t0:.1f} s")
            return 0 if ok else 1
        except Exception as e:  # noqa: BLE001 - the demo reports, then cleans up
            print(f"demo failed: {e}", file=sys.stderr)
            for name in ("server", *(f"agent-{d}" for d in DEVICES)):
                tail = lab.log(name).splitlines()[-15:]
                if tail:
                    print(f"--- {name} log (tail) ---", *tail, sep="\n", file=sys.stderr)
            return 1
        finally:
            lab.close()


if __name__ == "__main__":
    sys.exit(main())
