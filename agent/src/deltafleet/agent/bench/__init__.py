"""On-device benchmarks, off the request path.

A ``BenchRequest`` (retained on the device's ``benchreq`` topic, signed by the same online keys
as manifests and checked by the same trust store: signature, expiry, device binding) names
candidate variant files by sha256. ``BenchRunner`` works through requests on one background
thread: each file is taken from the model store when the device has it, else fetched as the
chunks of its identity artifact (each chunk checked against the signed hash list, the whole
file against its sha256), and measured in a child process at low priority
(``os.nice(BENCH_NICE)``; ``worker.py`` says what is measured). Each variant's figures (or the
error that kept it from being measured) go into the outbox as a ``BenchResult`` with a stable
id, sent until the server acks them. A request id once done is recorded in
``bench/done.json`` so a retained request is not run twice, across restarts too.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from deltafleet.shared import ChunkRequest, DeltafleetError, atomic_write_json, encode, sha256_file
from deltafleet.shared.hashing import sha256_bytes
from deltafleet.shared.messages import BenchRequest, BenchResult, BenchVariant, decode

from ..runtime import available_runtimes

__all__ = ["BENCH_NICE", "BenchRunner", "verify_bench_request"]

log = logging.getLogger(__name__)

BENCH_NICE = 10
MAX_BENCH_REQUEST_BYTES = 256 * 1024
FETCH_TIMEOUT_S = 120.0
CHUNK_RETRY_S = 3.0
WORKER_TIMEOUT_S = 300.0
_FORMAT_RUNTIME = {"onnx": ("onnxruntime",), "tflite": ("litert", "tflite-runtime")}


def verify_bench_request(data: bytes, trust: Any, device_id: str,
                         now: float | None = None) -> BenchRequest:
    """The request, if a trusted key signed it, it is unexpired and for this device;
    DeltafleetError otherwise (the same verifier manifests go through)."""
    t = time.time() if now is None else now
    payload = trust.verify(data, int(t), MAX_BENCH_REQUEST_BYTES)
    req = BenchRequest.from_wire(payload)
    if req.device_id != device_id:
        raise DeltafleetError(f"bench request for device {req.device_id}, not {device_id}")
    if req.expires_at < t:
        raise DeltafleetError(f"bench request {req.request_id} has expired")
    return req


class _Fetch:
    """One variant file being fetched as chunks (hash-checked), written into a temp file."""

    def __init__(self, v: BenchVariant, path: Path) -> None:
        assert v.artifact is not None
        self.v = v
        self.art = v.artifact
        self.path = path
        self.have: set[int] = set()
        self.done = threading.Event()
        self.lock = threading.Lock()
        with open(path, "wb") as f:
            f.truncate(v.size_bytes)

    def accept(self, index: int, data: bytes) -> None:
        with self.lock:
            if index in self.have or index >= len(self.art.chunks):
                return
            if sha256_bytes(data) != self.art.chunks[index]:
                return
            with open(self.path, "r+b") as f:
                f.seek(index * self.art.chunk_size_bytes)
                f.write(data)
            self.have.add(index)
            if len(self.have) == len(self.art.chunks):
                self.done.set()

    def missing(self) -> list[int]:
        with self.lock:
            return [i for i in range(len(self.art.chunks)) if i not in self.have]


class BenchRunner:
    """Runs verified bench requests on one background thread (see the module docstring)."""

    def __init__(self, state_dir: Path, device_id: str, *, store: Any, outbox: Any, mqtt: Any,
                 topics: Any, sysfs_root: str = "/sys") -> None:
        self.dir = Path(state_dir) / "bench"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device_id = device_id
        self.store, self.outbox, self.mqtt, self.topics = store, outbox, mqtt, topics
        self.sysfs_root = sysfs_root
        self._queue: queue.Queue[BenchRequest | None] = queue.Queue()
        self._fetches: dict[str, _Fetch] = {}
        self._thread: threading.Thread | None = None
        self._done_file = self.dir / "done.json"
        self._queued: set[str] = set()
        try:
            self._done = set(json.loads(self._done_file.read_text()))
        except (OSError, ValueError, TypeError):
            self._done = set()

    # -- from the agent's loop -------------------------------------------------------------
    def submit(self, req: BenchRequest) -> bool:
        """Queue a verified request; False when it was done or queued before."""
        if req.request_id in self._done or req.request_id in self._queued:
            return False
        self._queued.add(req.request_id)
        self._queue.put(req)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bench", daemon=True)
            self._thread.start()
        return True

    def wants(self, sha: str) -> bool:
        return sha in self._fetches

    def on_chunk(self, sha: str, index: int, data: bytes) -> None:
        fetch = self._fetches.get(sha)
        if fetch is not None:
            fetch.accept(index, data)

    def stop(self) -> None:
        self._queue.put(None)

    # -- the bench thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            try:
                self._bench(req)
            except Exception:  # a bug costs this request, never the agent
                log.exception("bench request %s failed", req.request_id)
            self._done.add(req.request_id)
            try:
                atomic_write_json(self._done_file, sorted(self._done)[-500:])
            except OSError as e:
                log.warning("cannot record done bench requests: %s", e)

    def _bench(self, req: BenchRequest) -> None:
        runtimes = available_runtimes()
        for i, v in enumerate(req.variants):
            runtime = next((r for r in _FORMAT_RUNTIME[v.format] if r in runtimes), None)
            figures: dict[str, int] = {}
            error = ""
            if runtime is None:
                error = f"no {v.format} runtime on this device"
            else:
                try:
                    path = self._file(v)
                    figures = self._measure(path, v, req)
                except DeltafleetError as e:
                    error = str(e)
            result = BenchResult(
                result_id=f"{req.request_id}-{i}", device_id=self.device_id,
                request_id=req.request_id, variant=v.name[:64], sha256=v.sha256,
                runtime=runtime or "none", runtime_version=runtimes.get(runtime or "", "")[:64],
                figures=figures, error=error[:500])
            self.outbox.put(result.result_id, self.topics.bench(self.device_id), encode(result))
            log.info("benchmarked %s (%s): %s", v.name, v.sha256[:12],
                     error or f"p50 {figures.get('p50_us')} us")

    def _file(self, v: BenchVariant) -> Path:
        on_disk = self.store.model_path(v.sha256, v.format)
        if on_disk.is_file():
            return on_disk
        cached = self.dir / f"{v.sha256}.{v.format}"
        if cached.is_file() and sha256_file(cached) == v.sha256:
            return cached
        if v.artifact is None:
            raise DeltafleetError(f"{v.sha256[:12]} is not on the device and has no artifact")
        tmp = self.dir / f".{v.sha256}.part"
        fetch = self._fetches[v.sha256] = _Fetch(v, tmp)
        try:
            self.mqtt.subscribe(self.topics.chunk_filter(v.sha256))
            deadline = time.monotonic() + FETCH_TIMEOUT_S
            while not fetch.done.is_set():
                if time.monotonic() > deadline:
                    raise DeltafleetError(f"fetching {v.sha256[:12]} timed out")
                missing = fetch.missing()
                for j in range(0, len(missing), 4096):
                    self.mqtt.publish(self.topics.chunk_request(self.device_id), encode(
                        ChunkRequest(self.device_id, v.sha256, tuple(missing[j:j + 4096]))))
                fetch.done.wait(CHUNK_RETRY_S)
        finally:
            self._fetches.pop(v.sha256, None)
            self.mqtt.unsubscribe(self.topics.chunk_filter(v.sha256))
        if sha256_file(tmp) != v.sha256:
            tmp.unlink(missing_ok=True)
            raise DeltafleetError(f"fetched file does not hash to {v.sha256[:12]}")
        os.replace(tmp, cached)
        return cached

    def _measure(self, path: Path, v: BenchVariant, req: BenchRequest) -> dict[str, int]:
        spec = {"path": str(path), "format": v.format, "runs": req.runs, "warmup": req.warmup,
                "golden_inputs": list(req.golden_inputs), "sysfs_root": self.sysfs_root}
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=self.dir, delete=False) as f:
            json.dump(spec, f)
        try:
            res = subprocess.run(
                [sys.executable, "-m", "deltafleet.agent.bench.worker", f.name],
                capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                preexec_fn=lambda: os.nice(BENCH_NICE))  # noqa: PLW1509 - no threads in the child yet
        except subprocess.TimeoutExpired as e:
            raise DeltafleetError(f"benchmark of {v.name} took over {WORKER_TIMEOUT_S:.0f} s") from e
        finally:
            Path(f.name).unlink(missing_ok=True)
        try:
            doc = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeltafleetError(f"benchmark child failed: {tail[:300]}") from None
        if not doc.get("ok"):
            raise DeltafleetError(f"benchmark of {v.name}: {doc.get('error', '?')}")
        return {k: int(x) for k, x in doc["figures"].items()}


def decode_bench_request(payload: bytes) -> BenchRequest:  # for tests and tools
    return decode(BenchRequest, payload)
