"""`make demo`: a model update reaching real agents as a verified bsdiff delta over MQTT.

Starts a broker (Mosquitto if installed, else embedded amqtt; or FLEET_MQTT_URL), a server with
SQLite in a temp home, and three agents as separate processes (jetson-1, jetson-2, rpi-1). Rolls
v1 to the whole fleet (full artifact), then v2 (last layer retrained) to `--group jetson` (delta),
and prints what each device runs. Leaves no process behind.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from fleetlab import Lab, wait_for  # noqa: E402
from modelgen import make_onnx_pair  # noqa: E402

from deltafleet.agent.client import AgentClient  # noqa: E402

DEVICES = {"jetson-1": "jetson", "jetson-2": "jetson", "rpi-1": "rpi"}


def online(lab: Lab) -> set[str]:
    """Devices the server has marked online (read from its database: polling through
    `fleetctl device list` would pay the CLI's start-up on every poll)."""
    from deltafleet.server import registry
    from deltafleet.server.store import Store

    store = Store(lab.env.get("FLEET_DB_URL") or f"sqlite:///{lab.home}/fleet.db")
    try:
        with store.session() as s:
            return {d.id for d in registry.list_devices(s) if d.online}
    finally:
        store.dispose()


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
            lab.fleetctl("model", "add", "detector", "v1", str(v1), echo=True)
            lab.fleetctl("model", "add", "detector", "v2", str(v2), echo=True)
            lab.fleetctl("group", "create", "fleet", "--match", "site=demo", echo=True)
            lab.fleetctl("group", "create", "jetson", "--match", "hw=jetson", echo=True)
            lab.start_server()
            for device_id, hw in DEVICES.items():
                lab.start_agent(device_id, {"hw": hw, "site": "demo"})
            wait_for(lambda: online(lab) >= set(DEVICES), 30, "3 agents online")
            print(f"agents online: {', '.join(DEVICES)}")

            lab.fleetctl("rollout", "model", "v1", "--group", "fleet", "--wait",
                         "--timeout", "60", "--health-window", "1s", echo=True)
            res = lab.fleetctl("rollout", "model", "v2", "--group", "jetson", "--wait",
                               "--timeout", "60", "--health-window", "1s", "--json", echo=True)
            status = json.loads(res.stdout)
            print(f"rollout {status['id']}: {status['state']}; bytes sent "
                  f"{status['bytes_sent']:,} of {status['full_bytes']:,} full\n")
            print(f"{'device':<10} {'group':<7} {'runs':<5} {'sha256':<14} {'v2 bytes sent':>14} "
                  f"{'full':>10}")
            sent = {t["device"]: t for t in status["targets"]}
            for device_id, hw in DEVICES.items():
                running = lab.agent_status(device_id)[0]
                t = sent.get(device_id)
                sent_s = f"{t['bytes_sent']:,} ({t['artifact']})" if t else "-"
                full_s = f"{t['full_bytes']:,}" if t else "-"
                print(f"{device_id:<10} {hw:<7} {running['version']:<5} "
                      f"{running['sha256'][:12]:<14} {sent_s:>14} {full_s:>10}")
            x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
            for device_id in DEVICES:
                with AgentClient(port=lab.api_ports[device_id]) as client:
                    answer = client.predict("detector", x)
                print(f"{device_id}: local inference API answered with detector "
                      f"{answer.version}{' (fallback)' if answer.fallback else ''}")
            ok = status["state"] == "completed" and lab.agent_status("rpi-1")[0]["version"] == "v1"
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
