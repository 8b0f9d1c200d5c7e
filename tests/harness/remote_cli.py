"""fleetctl on the server's host and through the management API, side by side.

``api_fleet`` (the integration conftest's fixture) runs a real `fleetctl server` with its API
on an HTTPS listener (a certificate from a private CA), a real Mosquitto and two fleet-agent
processes; ``local`` runs a command on the server's store, ``remote`` the same through
FLEET_API_URL with no access to the server's home, and ``same`` asserts both print the same.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltafleet.server import pki

from .fleetlab import BIN, Lab, free_port, wait_for
from .modelgen import make_onnx_pair

__all__ = ["API_ENV", "DEVICES", "api_fleet", "local", "remote", "same", "same_as"]

DEVICES = {"cam-1": "jetson", "cam-2": "jetson"}
API_ENV = ("FLEET_API_URL", "FLEET_API_TOKEN", "FLEET_API_TOKEN_FILE", "FLEET_API_CA")


@contextmanager
def api_fleet(root: Path, broker_url: str, topic_prefix: str) -> Iterator[dict[str, Any]]:
    """The fleet: tokens per role, detector:v1 added through the API (admin), group ``cams``
    and a completed rollout of v1 to both agents (``rolled``, ``rollout``); v2 is on disk."""
    lab = Lab(root / "lab", mqtt_url=broker_url)
    for name in API_ENV:
        lab.env.pop(name, None)
    lab.env["FLEET_TOPIC_PREFIX"] = topic_prefix  # the session broker is shared
    lab.env["COLUMNS"] = "200"
    ca = pki.create_ca("test CA")
    leaf = pki.issue_cert(ca, "fleet-api", server_hosts=["127.0.0.1"])
    (root / "api.crt").write_bytes(leaf.cert_pem)
    (root / "api.key").write_bytes(leaf.key_pem)
    (root / "ca.crt").write_bytes(ca.cert_pem)
    port = free_port()
    lab.env.update({"FLEET_API_LISTEN": f"127.0.0.1:{port}",
                    "FLEET_API_TLS_CERT": str(root / "api.crt"),
                    "FLEET_API_TLS_KEY": str(root / "api.key")})
    try:
        v1, v2 = make_onnx_pair(root / "models", size_mb=0.5)
        tokens = lab.serve_api(port, DEVICES)
        fleet = {"lab": lab, "url": f"https://127.0.0.1:{port}", "tokens": tokens,
                 "ca": root / "ca.crt", "v1": v1, "v2": v2, "root": root}
        added = remote(fleet, "model", "add", "detector", "v1", str(v1), role="admin")
        assert added.returncode == 0, added.stderr
        fleet["added"] = added.stdout
        grouped = remote(fleet, "group", "create", "cams", "--match", "hw=jetson")
        assert grouped.returncode == 0, grouped.stderr
        wait_for(lambda: lab.online_devices() == set(DEVICES), 60, "agents online")
        rolled = remote(fleet, "rollout", "model", "detector:v1", "-g", "cams",
                        "--health-window", "1s", "--wait", "--timeout", "90s")
        fleet["rolled"] = rolled
        fleet["rollout"] = int(re.match(r"rollout (\d+) started", rolled.stdout).group(1))
        yield fleet
    finally:
        lab.close()


def local(fleet: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return fleet["lab"].fleetctl(*args, check=False)


def remote(fleet: dict[str, Any], *args: str, role: str = "operator",
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """fleetctl through the API, with no access to the server's home."""
    lab_env = {k: v for k, v in fleet["lab"].env.items() if not k.startswith("FLEET_")}
    lab_env.update({"FLEET_API_URL": fleet["url"], "FLEET_API_TOKEN": fleet["tokens"][role],
                    "FLEET_API_CA": str(fleet["ca"]), "COLUMNS": "200",
                    "FLEET_HOME": str(fleet["root"] / "no-such-home")})
    lab_env.update(env or {})
    return subprocess.run([str(BIN / "fleetctl"), *args], env=lab_env, text=True,
                          capture_output=True, timeout=120)


AGES = re.compile(r"\b\d+[smhd]\b")
CLOCK = re.compile(r"\b(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d\b")
TIMING_KEYS = {"last_seen"}


def _untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def same(fleet: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``args`` locally and through the API: the same exit code, stdout and stderr
    (ages and ``last_seen`` aside: the agents keep reporting in between)."""
    return same_as(fleet, "operator", *args)


def same_as(fleet: dict[str, Any], role: str, *args: str) -> subprocess.CompletedProcess[str]:
    mine, theirs = local(fleet, *args), remote(fleet, *args, role=role)
    assert (theirs.returncode, theirs.stderr) == (mine.returncode, mine.stderr), \
        (args, theirs.stderr[-3000:])
    if "--json" in args and mine.returncode == 0:
        assert _untimed(json.loads(theirs.stdout)) == _untimed(json.loads(mine.stdout)), args
    else:
        assert AGES.sub("-", CLOCK.sub("-", theirs.stdout)) == \
            AGES.sub("-", CLOCK.sub("-", mine.stdout)), args
    return theirs
