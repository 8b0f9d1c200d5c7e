"""Delta engine: builds bsdiff4 deltas in a worker process, off the MQTT loop, and caches
one per (base, target) pair. Every delta is round-tripped (patch(base, delta) == target sha256)
before it is stored; a delta that fails is never published and the full artifact is sent.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bsdiff4

from deltafleet.shared import sha256_bytes

log = logging.getLogger(__name__)
CODEC = "bsdiff4"


@dataclass(frozen=True, slots=True)
class BuiltDelta:
    base_sha256: str
    target_sha256: str
    codec: str
    path: Path  # temp file holding the delta, to be moved into the blob store
    sha256: str
    size_bytes: int
    build_seconds: float


def build_bsdiff_delta(base_path: str, target_path: str, target_sha256: str, out_dir: str) -> BuiltDelta:
    """Worker-process entry point. Raises ValueError if the round trip fails."""
    t0 = time.perf_counter()
    base = Path(base_path).read_bytes()
    target = Path(target_path).read_bytes()
    delta = bsdiff4.diff(base, target)
    if sha256_bytes(bsdiff4.patch(base, delta)) != target_sha256:
        raise ValueError("delta does not round-trip to the target")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".delta.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(delta)
        f.flush()
        os.fsync(f.fileno())
    return BuiltDelta(sha256_bytes(base), target_sha256, CODEC, Path(tmp), sha256_bytes(delta),
                      len(delta), time.perf_counter() - t0)


class DeltaBuilder:
    """Submits builds to a process pool and hands back the finished ones."""

    def __init__(self, work_dir: Path, max_workers: int = 1) -> None:
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._pool = cf.ProcessPoolExecutor(
            max_workers=max_workers, mp_context=multiprocessing.get_context("spawn")
        )
        self._futures: dict[tuple[str, str], cf.Future[BuiltDelta]] = {}
        self.failed: dict[tuple[str, str], str] = {}

    def building(self, base: str, target: str) -> bool:
        return (base, target) in self._futures

    def submit(self, base: str, base_path: Path, target: str, target_path: Path) -> None:
        key = (base, target)
        if key in self._futures or key in self.failed:
            return
        log.info("building %s delta %s -> %s", CODEC, base[:12], target[:12])
        self._futures[key] = self._pool.submit(
            build_bsdiff_delta, str(base_path), str(target_path), target, str(self.work_dir)
        )

    def finished(self) -> list[BuiltDelta]:
        done: list[BuiltDelta] = []
        for key, fut in list(self._futures.items()):
            if not fut.done():
                continue
            del self._futures[key]
            try:
                done.append(fut.result())
            except Exception as e:  # noqa: BLE001 - a failed build means "send the full model"
                log.error("delta %s -> %s failed: %s", key[0][:12], key[1][:12], e)
                self.failed[key] = str(e)
        return done

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
