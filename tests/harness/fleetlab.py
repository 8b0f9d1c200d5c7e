"""A small lab of real processes: broker, `fleetctl server`, `fleet-agent`s, `fleetctl` calls.

Used by the demo (`make demo`) and the end-to-end tests, so both exercise exactly what an
operator runs. Every process started here is stopped by ``Lab.close()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


class Lab:
    def __init__(self, root: Path, *, mqtt_url: str | None = None, db_url: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "server-home"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.api_ports: dict[str, int] = {}
        self.mqtt_url = mqtt_url
        self.env = dict(os.environ)
        self.env["FLEET_HOME"] = str(self.home)
        self.env["PYTHONUNBUFFERED"] = "1"
        if db_url:
            self.env["FLEET_DB_URL"] = db_url
        else:
            self.env.pop("FLEET_DB_URL", None)
        if mqtt_url:
            self.env["FLEET_MQTT_URL"] = mqtt_url

    # -- processes -------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str],
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env or self.env,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_broker(self) -> str:
        """Mosquitto on a free port when its binary exists, else an embedded amqtt broker."""
        port = free_port()
        mosquitto = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if mosquitto:
            conf = self.root / "mosquitto.conf"
            # the queue bound `fleetctl broker config` writes: a whole fleet's burst of hellos fits
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                            "persistence false\nmax_queued_messages 70000\n")
            self._spawn("broker", [mosquitto, "-c", str(conf)])
            kind = "mosquitto"
        else:
            conf = self.root / "amqtt.yaml"
            conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                            "    allow_anonymous: true\n")
            self._spawn("broker", [str(BIN / "amqtt"), "-c", str(conf)])
            kind = "amqtt (MQTT 3.1.1)"
        wait_port(port)
        self.mqtt_url = f"mqtt://127.0.0.1:{port}"
        self.env["FLEET_MQTT_URL"] = self.mqtt_url
        self.broker_kind = kind
        return self.mqtt_url

    def start_server(self, name: str = "server") -> subprocess.Popen[bytes]:
        return self._spawn(name, [str(BIN / "fleetctl"), "server"])

    def agent_dir(self, device_id: str) -> Path:
        return self.root / "devices" / device_id

    def start_agent(self, device_id: str, labels: dict[str, str], *,
                    extra_env: dict[str, str] | None = None,
                    trusted_key: Path | None = None) -> subprocess.Popen[bytes]:
        assert self.mqtt_url, "start or name a broker first"
        key = trusted_key or self.home / "keys" / "signing.pub"
        # each agent serves its local API on its own port (a test may choose it)
        self.api_ports[device_id] = int((extra_env or {}).get("FLEET_AGENT_API_PORT")
                                        or free_port())
        argv = [str(BIN / "fleet-agent"), "run", "--device-id", device_id,
                "--broker", self.mqtt_url, "--state-dir", str(self.agent_dir(device_id)),
                "--trusted-key", str(key), "--api-port", str(self.api_ports[device_id])]
        for k, v in labels.items():
            argv += ["--label", f"{k}={v}"]
        env = dict(self.env)
        env.update(extra_env or {})
        return self._spawn(f"agent-{device_id}", argv, env)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def close(self) -> None:
        for name in [n for n in self.procs if n != "broker"] + ["broker"]:
            self.stop(name)

    # -- fleetctl / fleet-agent ------------------------------------------------------------
    def fleetctl(self, *args: str, check: bool = True,
                 echo: bool = False) -> subprocess.CompletedProcess[str]:
        if echo:
            print(f"$ fleetctl {' '.join(args)}", flush=True)
        res = subprocess.run([str(BIN / "fleetctl"), *args], env=self.env, text=True,
                             capture_output=True, timeout=300)
        if check and res.returncode != 0:
            raise RuntimeError(f"fleetctl {' '.join(args)} exited {res.returncode}: "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res

    def seed_detector(self, models_dir: Path, *, size_mb: float, site: str,
                      devices: dict[str, str],
                      agent_env: dict[str, str] | None = None) -> tuple[Path, Path]:
        """The common fleet of the e2e, metrics and monitor runs: ``detector`` v1 and v2 (an
        ONNX pair), groups ``fleet`` (site=SITE) and ``jetson`` (hw=jetson), the server, and
        one agent per ``devices`` entry (id -> hw label). Returns the two model files."""
        from tests.harness.modelgen import make_onnx_pair  # noqa: PLC0415

        v1, v2 = make_onnx_pair(models_dir, size_mb=size_mb)
        self.fleetctl("init")
        self.fleetctl("model", "add", "detector", "v1", str(v1))
        self.fleetctl("model", "add", "detector", "v2", str(v2))
        self.fleetctl("group", "create", "fleet", "--match", f"site={site}")
        self.fleetctl("group", "create", "jetson", "--match", "hw=jetson")
        self.start_server()
        for device_id, hw in devices.items():
            self.start_agent(device_id, {"hw": hw, "site": site}, extra_env=agent_env)
        return v1, v2

    def fleetctl_json(self, *args: str) -> Any:
        return json.loads(self.fleetctl(*args, "--json").stdout)

    def serve_api(self, port: int, devices: dict[str, str], *,
                  prepare: Callable[[Lab], object] | None = None) -> dict[str, str]:
        """Initialise the home (then ``prepare(self)``), make a token per role (name
        ``ROLE-1``), start the server (its API on ``port``; FLEET_API_LISTEN set by the caller)
        and one agent per device id (label ``hw`` from ``devices``, ``site=lab``); the tokens
        by role."""
        self.fleetctl("init")
        if prepare is not None:
            prepare(self)
        tokens = {role: self.fleetctl_json("token", "create", f"{role}-1", "--role", role)["token"]
                  for role in ("viewer", "operator", "admin")}
        self.start_server()
        wait_port(port, 30)
        for device_id, hw in devices.items():
            self.start_agent(device_id, {"hw": hw, "site": "lab"})
        return tokens

    def agent_status(self, device_id: str) -> list[dict[str, Any]]:
        res = subprocess.run([str(BIN / "fleet-agent"), "status", "--json", "--state-dir",
                              str(self.agent_dir(device_id))], text=True, capture_output=True)
        return json.loads(res.stdout)["models"] if res.returncode == 0 else []

    def online_devices(self) -> set[str]:
        return {d["id"] for d in self.fleetctl_json("device", "list") if d.get("online")}

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
