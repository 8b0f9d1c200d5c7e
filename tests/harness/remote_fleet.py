"""A `fleetctl server` with its management API on HTTPS (a certificate from a private CA) and
`fleetctl` run against it as a client: the same command locally and through FLEET_API_URL.

``api_fleet(root, broker_url, prefix)`` initialises a ``Lab``, makes a viewer, an operator and
an admin token (``viewer-1``, ...), starts the server and waits for its listener; the caller
adds agents and closes ``fleet["lab"]``. ``remote(fleet, *args, role=...)`` runs fleetctl with
only the URL, the token and the CA (no FLEET_HOME); ``same_as(fleet, role, *args)`` asserts a
command prints and exits the same both ways.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltafleet.server import pki
from tests.harness.fleetlab import BIN, Lab, free_port

API_ENV = ("FLEET_API_URL", "FLEET_API_TOKEN", "FLEET_API_TOKEN_FILE", "FLEET_API_CA")
ROLES = ("viewer", "operator", "admin")


def api_fleet(root: Path, broker_url: str, prefix: str, *,
              prepare: Callable[[Lab], object] | None = None) -> dict[str, Any]:
    """{"lab", "url", "tokens" (by role), "ca", "root"}: the server running, its API up.
    ``prepare(lab)`` runs after `fleetctl init`, before the server starts."""
    lab = Lab(root / "lab", mqtt_url=broker_url)
    try:
        for name in API_ENV:
            lab.env.pop(name, None)
        lab.env["FLEET_TOPIC_PREFIX"] = prefix  # the session broker is shared
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
        tokens = lab.serve_api(port, {}, prepare=prepare)
    except BaseException:
        lab.close()
        raise
    return {"lab": lab, "url": f"https://127.0.0.1:{port}", "tokens": tokens,
            "ca": root / "ca.crt", "root": root}


def client_env(fleet: dict[str, Any], role: str) -> dict[str, str]:
    """What a CI job has: the URL, a token and the listener's CA; no server home."""
    env = {k: v for k, v in fleet["lab"].env.items() if not k.startswith("FLEET_")}
    env.update({"FLEET_API_URL": fleet["url"], "FLEET_API_TOKEN": fleet["tokens"][role],
                "FLEET_API_CA": str(fleet["ca"]), "COLUMNS": "200",
                "FLEET_HOME": str(fleet["root"] / "no-such-home")})
    return env


def local(fleet: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return fleet["lab"].fleetctl(*args, check=False)


def remote(fleet: dict[str, Any], *args: str, role: str = "operator",
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """fleetctl through the API, with no access to the server's home."""
    return subprocess.run([str(BIN / "fleetctl"), *args], env={**client_env(fleet, role),
                                                                **(env or {})},
                          text=True, capture_output=True, timeout=300)


AGES = re.compile(r"\b\d+[smhd]\b")
CLOCK = re.compile(r"\b(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d\b")
TIMING_KEYS = {"last_seen"}


def untimed(value: Any, keys: set[str] = TIMING_KEYS) -> Any:
    if isinstance(value, dict):
        return {k: untimed(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [untimed(v, keys) for v in value]
    return value


def same_as(fleet: dict[str, Any], role: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``args`` locally and through the API with ``role``'s token: the same exit code,
    stdout and stderr (ages, clocks and ``last_seen`` aside); the remote run is returned."""
    mine, theirs = local(fleet, *args), remote(fleet, *args, role=role)
    assert (theirs.returncode, theirs.stderr) == (mine.returncode, mine.stderr), \
        (args, theirs.stderr[-3000:], mine.stderr[-3000:])
    if "--json" in args and mine.returncode == 0:
        assert untimed(json.loads(theirs.stdout)) == untimed(json.loads(mine.stdout)), args
    else:
        assert AGES.sub("-", CLOCK.sub("-", theirs.stdout)) == \
            AGES.sub("-", CLOCK.sub("-", mine.stdout)), args
    return theirs
