"""fleetctl on the server's host and through the management API, side by side, on a fleet of
two real agents that already run detector:v1.

``api_fleet`` (the integration conftest's fixture) is ``remote_fleet.api_fleet`` (a real
`fleetctl server` with its API on HTTPS, tokens per role) plus two fleet-agent processes,
detector:v1 added through the API (admin), group ``cams`` and a completed rollout of v1 to both
(``rolled``, ``rollout``); v2 is on disk. ``local``, ``remote``, ``same`` and ``same_as``
compare the two paths (``remote_fleet``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .fleetlab import wait_for
from .modelgen import make_onnx_pair
from .remote_fleet import API_ENV, local, remote, same_as
from .remote_fleet import api_fleet as serving_api

__all__ = ["API_ENV", "DEVICES", "api_fleet", "local", "remote", "same", "same_as"]

DEVICES = {"cam-1": "jetson", "cam-2": "jetson"}


@contextmanager
def api_fleet(root: Path, broker_url: str, topic_prefix: str) -> Iterator[dict[str, Any]]:
    fleet = serving_api(root, broker_url, topic_prefix)
    lab = fleet["lab"]
    try:
        v1, v2 = make_onnx_pair(root / "models", size_mb=0.5)
        for device_id, hw in DEVICES.items():
            lab.start_agent(device_id, {"hw": hw, "site": "lab"})
        fleet.update({"v1": v1, "v2": v2})
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


def same(fleet: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``args`` locally and through the API with an operator token: the same exit code,
    stdout and stderr (ages and ``last_seen`` aside: the agents keep reporting in between)."""
    return same_as(fleet, "operator", *args)
