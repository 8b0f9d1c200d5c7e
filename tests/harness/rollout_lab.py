"""An in-process server (FleetServer in a thread) plus a simulated fleet on a real broker.

``stop_server()`` returns only once the server thread has ended: from then on nothing consumes
device traffic or writes the database until ``start_server()``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltafleet.server import catalog, fleet
from deltafleet.server.config import ServerConfig
from deltafleet.server.daemon import FleetServer
from deltafleet.server.policy import RolloutPolicy
from deltafleet.server.rollouts import act_on_rollout, create_rollout, get_rollout, rollout_json
from deltafleet.server.store import BlobStore, Store, upgrade
from deltafleet.shared import SigningKey

from .fleetlab import wait_for
from .fleetsim import Installed, SimFleet

FLEETCTL = Path(sys.executable).with_name("fleetctl")


class RolloutLab:
    def __init__(self, root: Path, broker_url: str, model_files: dict[str, Path], *,
                 db_url: str | None = None) -> None:
        self.Installed = Installed
        self.cfg = ServerConfig(home=root / "home", db_url=db_url or f"sqlite:///{root}/fleet.db",
                                mqtt_url=broker_url,
                                topic_prefix=f"t{uuid.uuid4().hex[:8]}/v1")
        upgrade(self.cfg.db_url)
        SigningKey.generate().save(self.cfg.signing_key_path, self.cfg.public_key_path)
        self.store = Store(self.cfg.db_url)
        self.blobs = BlobStore(self.cfg.blobs_dir)
        self.files = model_files
        with self.store.session() as s:
            for version, path in model_files.items():
                catalog.add_model_version(s, self.blobs, "detector", version, path)
        self.fleet = SimFleet(broker_url, self.cfg.public_key_path, prefix=self.cfg.topic_prefix)
        self.server: FleetServer | None = None
        self._thread: threading.Thread | None = None

    def start_server(self) -> None:
        self.server = FleetServer(self.cfg, Store(self.cfg.db_url))
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        self.server.mqtt.wait_connected(10)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop_event.set()
            assert self._thread is not None
            self._thread.join(10)
            assert not self._thread.is_alive(), "the server thread did not stop within 10 s"
            self.server = None

    def add_devices(self, n: int, labels: dict[str, str], *, prefix: str = "sim",
                    version: str | None = "v1") -> list[str]:
        ids = []
        for i in range(n):
            device_id = f"{prefix}-{i:03d}"
            models = ({"detector": self.Installed(version, self.files[version].read_bytes())}
                      if version else {})
            self.fleet.add(device_id, labels, models)
            ids.append(device_id)
        self.fleet.wait_connected()
        self.wait_for(lambda: self.known_devices() >= set(ids), 30, "devices registered")
        return ids

    def known_devices(self) -> set[str]:
        with self.store.session() as s:
            return {d.id for d in fleet.list_devices(s)}

    def device_online(self, device_id: str) -> bool:
        with self.store.session() as s:
            return bool(fleet.get_device(s, device_id).online)

    def status_runtimes(self, device_id: str) -> dict[str, str]:
        with self.store.session() as s:
            return dict(fleet.get_device(s, device_id).runtimes or {})

    def fleetctl(self, *args: str, columns: int = 100, actor: str | None = None,
                 timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """``fleetctl`` as a subprocess on this lab's store (its output, exit code)."""
        exe = [str(FLEETCTL)] if FLEETCTL.exists() else [
            sys.executable, "-c", "from deltafleet.server.cli import main; main()"]
        env = {**os.environ, "FLEET_HOME": str(self.cfg.home), "FLEET_DB_URL": self.cfg.db_url,
               "COLUMNS": str(columns), **({"FLEET_ACTOR": actor} if actor else {})}
        return subprocess.run([*exe, *args], capture_output=True, text=True, env=env,
                              timeout=timeout_s)

    def group(self, name: str, **selector: str) -> None:
        with self.store.session() as s:
            fleet.create_group(s, name, selector)

    def rollout(self, version: str, group: str, *, supersede: bool = False,
                **policy: Any) -> int:
        with self.store.session() as s:
            return create_rollout(s, f"detector:{version}", group, "test",
                                  policy=RolloutPolicy(**policy), supersede=supersede).id

    def act(self, rollout_id: int, action: str) -> bool:
        with self.store.session() as s:
            return act_on_rollout(s, rollout_id, action, "test")[1]

    def status(self, rollout_id: int) -> dict[str, Any]:
        with self.store.session() as s:
            return rollout_json(s, get_rollout(s, rollout_id))

    def wait_state(self, rollout_id: int, states: set[str], timeout_s: float = 60) -> dict[str, Any]:
        return self.wait_for(lambda: (d := self.status(rollout_id))["state"] in states and d,
                             timeout_s, f"rollout {rollout_id} in {states}")

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        return wait_for(predicate, timeout_s, what, interval_s=0.1)

    def close(self) -> None:
        self.stop_server()
        self.fleet.close()
        self.store.dispose()
