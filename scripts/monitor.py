"""`make monitor`: the demo fleet, kept running under a local Prometheus with the shipped rules.

Starts what `make demo` starts (a broker, `fleetctl server` with /metrics, three agents), a
Prometheus on a free port (or ``--port``) with ``deltafleet/server/monitoring/rules.yml``
scraping the server and every agent every 5 s, rolls v1 to the fleet and v2 to the jetson
group, then sends a trickle of inference requests to every device (a few per second, so the
inference panels move) and prints where to look. Runs until Ctrl-C, or
for ``--seconds`` (then exits 0 if every scrape target is up).

Run from the repository root as a module: ``python -m scripts.monitor``. Needs the
``prometheus`` binary (`make install` installs Debian's package when it is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

from deltafleet.agent.client import AgentClient
from deltafleet.server.monitoring import DASHBOARDS_DIR, PROVISIONING_DIR, RULES
from scripts.demo import DEVICES, online, rollout
from tests.harness.fleetlab import Lab, free_port, wait_for, wait_port
from tests.harness.prometheus import Prometheus

LOOK = {
    "devices online": 'max without (instance) (deltafleet_devices)',
    "devices per model version": 'sum by (model, version) (max without (instance) '
                                 '(deltafleet_device_models))',
    "inference requests/s by version": 'sum by (model, version) (max without (instance) '
                                       '(rate(deltafleet_fleet_inference_requests_total[1m])))',
    "bytes published by kind": 'sum by (kind) (deltafleet_published_bytes_total)',
}


def traffic(lab: Lab, stop: threading.Event, rate_per_s: float = 4.0) -> None:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    while not stop.is_set():
        for device_id in DEVICES:
            try:
                with AgentClient(port=lab.api_ports[device_id]) as client:
                    client.predict("detector", x)
            except Exception:  # noqa: BLE001 - a device restarting must not end the traffic
                pass
        stop.wait(1 / rate_per_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make monitor", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="Prometheus port (default: a free one)")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0 = Ctrl-C)")
    opts = p.parse_args(argv)
    prom_bin = shutil.which("prometheus")
    if not prom_bin:
        print("make monitor: no prometheus binary; run `make install` (installs Debian's "
              "prometheus package)", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="deltafleet-monitor-") as tmp:
        lab = Lab(Path(tmp), mqtt_url=os.environ.get("FLEET_MQTT_URL"))
        prom = None
        try:
            if lab.mqtt_url is None:
                lab.start_broker()
            metrics_port, api_port = free_port(), free_port()
            lab.env["FLEET_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
            lab.env["FLEET_API_LISTEN"] = f"127.0.0.1:{api_port}"
            lab.seed_detector(Path(tmp) / "models", size_mb=2.0, site="demo",
                              devices=DEVICES,
                              agent_env={"FLEET_AGENT_TELEMETRY_S": "10"})
            wait_port(metrics_port)
            prom = Prometheus(prom_bin, {
                "deltafleet-server": [f"127.0.0.1:{metrics_port}"],
                "deltafleet-agent": [f"127.0.0.1:{port}" for port in lab.api_ports.values()],
            }, rules=[RULES], interval_s=5.0, port=opts.port or None,
                root=Path(tmp) / "prometheus")
            wait_for(lambda: online(lab) >= set(DEVICES), 30, "3 agents online")
            sender = threading.Thread(target=traffic, args=(lab, stop), daemon=True)
            sender.start()
            rollout(lab, "v1", "fleet")
            rollout(lab, "v2", "jetson")
            print(f"\nPrometheus:  {prom.url}   (alerts: {prom.url}/alerts, targets: "
                  f"{prom.url}/targets, rules: {RULES})")
            print(f"server:      http://127.0.0.1:{metrics_port}/metrics")
            for device_id, port in lab.api_ports.items():
                print(f"{device_id + ':':<12} http://127.0.0.1:{port}/metrics")
            print(f"dashboards:  {DASHBOARDS_DIR} (Grafana provisioning: {PROVISIONING_DIR})")
            token = lab.fleetctl("token", "create", "monitor", "--role", "operator",
                                 "--json").stdout
            print(f"console:     http://127.0.0.1:{api_port}/  (operator token: "
                  f"{json.loads(token).get('token', '?')})")
            print("try:")
            for what, expr in LOOK.items():
                print(f"  {what:<32} {prom.url}/graph?g0.expr={urllib.parse.quote(expr)}")
            print("Ctrl-C stops everything." if not opts.seconds else
                  f"stopping in {opts.seconds:.0f} s.", flush=True)
            deadline = time.monotonic() + opts.seconds if opts.seconds else None
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                stop.wait(1)
            up = prom.targets_up()
            print(json.dumps({"targets_up": up}))
            return 0 if up and all(up.values()) else 1
        except KeyboardInterrupt:
            return 0
        except Exception as e:  # noqa: BLE001 - report, then clean up
            print(f"make monitor failed: {e}", file=sys.stderr)
            return 1
        finally:
            stop.set()
            if prom is not None:
                prom.close()
            lab.close()


if __name__ == "__main__":
    sys.exit(main())
