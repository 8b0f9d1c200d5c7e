"""A real Prometheus for tests and `make monitor`: its own config, rules and temp storage, on a
free port (never the system service's 9090), stopped by ``close()``."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .fleetlab import free_port


def scrape_config(jobs: dict[str, list[str]], *, interval_s: float = 1.0,
                  rules: list[Path] = ()) -> str:  # type: ignore[assignment]
    """prometheus.yml text: one job per entry of ``jobs`` (its host:port targets)."""
    every = f"{round(interval_s * 1000)}ms"
    lines = ["global:", f"  scrape_interval: {every}", f"  evaluation_interval: {every}"]
    if rules:
        lines += ["rule_files:"] + [f"  - {json.dumps(str(r))}" for r in rules]
    lines.append("scrape_configs:")
    for job, targets in jobs.items():
        lines += [f"  - job_name: {json.dumps(job)}", "    static_configs:",
                  f"      - targets: {json.dumps(targets)}"]
    return "\n".join(lines) + "\n"


class Prometheus:
    def __init__(self, binary: str, jobs: dict[str, list[str]], *, rules: list[Path] = (),  # type: ignore[assignment]
                 interval_s: float = 1.0, port: int | None = None, root: Path | None = None,
                 retention: str = "2h") -> None:
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="deltafleet-prom-")
        self.root = Path(root or self._tmp.name)  # type: ignore[union-attr]
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = self.root / "prometheus.yml"
        self.config.write_text(scrape_config(jobs, interval_s=interval_s, rules=list(rules)))
        self.log_path = self.root / "prometheus.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", f"--storage.tsdb.retention.time={retention}",
             "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready on {self.url}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.loads(r.read())
        if doc.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {doc}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, seconds: float, step_s: float = 1.0) -> list[dict[str, Any]]:
        now = time.time()
        return list(self.api("query_range", query=expr, start=str(now - seconds),
                             end=str(now), step=str(step_s))["result"])

    def targets_up(self) -> dict[str, bool]:
        active = self.api("targets")["activeTargets"]
        return {t["scrapeUrl"]: t["health"] == "up" for t in active}

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def promtool(tool: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, *args], input=stdin.decode() if stdin is not None else None,
                          capture_output=True, text=True, timeout=60)


def which_prometheus() -> tuple[str | None, str | None]:
    return shutil.which("prometheus"), shutil.which("promtool")
