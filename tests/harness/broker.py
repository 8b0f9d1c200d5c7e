"""Mosquitto processes of a test's own, each on a free loopback port.

``Mosquitto`` is the one process class: it runs a config file, ``start()`` returns once the port
listens, ``stop()`` terminates (Mosquitto saves a persistent store on SIGTERM), ``kill()``
SIGKILLs (nothing saved). ``Broker`` is the anonymous broker most tests share,
``PersistentBroker`` one that keeps its store on disk across restarts on the same port, and
``tls_broker.TlsBroker`` one on the generated production config.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from .fleetlab import free_port, wait_port

__all__ = ["Broker", "Mosquitto", "PersistentBroker", "has_mosquitto", "mosquitto_binary"]


def mosquitto_binary() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def has_mosquitto() -> bool:
    return bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())


def run_as_root_line() -> str:
    """As root Mosquitto drops to user "mosquitto", who cannot use a test's private tmp dir."""
    return "user root\n" if os.geteuid() == 0 else ""


class Mosquitto:
    """A Mosquitto running ``conf`` on 127.0.0.1:``port``, logging to ``workdir``/mosquitto.log."""

    scheme = "mqtt"

    def __init__(self, workdir: Path, port: int, conf: Path) -> None:
        self.workdir = workdir
        self.port = port
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        with open(self.workdir / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                         stdout=log, stderr=log)
        wait_port(self.port, timeout_s)

    def kill(self) -> None:
        """SIGKILL: no chance to save anything."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Broker(Mosquitto):
    """Anonymous, no persistence, generous queues; started by the constructor."""

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_inflight_messages 100\nmax_queued_messages 10000\n{extra_config}")
        super().__init__(workdir, port, conf)
        self.start()


class PersistentBroker(Mosquitto):
    """Anonymous, its store in ``workdir``: stopped (or killed) and started again on the same
    port with the same store. ``autosave_interval_s`` also saves while running, so a SIGKILL
    loses at most that much. Not started by the constructor."""

    def __init__(self, workdir: Path, *, autosave_interval_s: int | None = None) -> None:
        port = free_port()
        conf = workdir / "mosquitto.conf"
        autosave = f"autosave_interval {autosave_interval_s}\n" if autosave_interval_s else ""
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir}/\n{autosave}max_queued_messages 10000\n"
            f"{run_as_root_line()}")
        super().__init__(workdir, port, conf)
