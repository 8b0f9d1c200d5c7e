"""Delta engine: builds deltas in a worker process, off the MQTT loop, and caches one per
(base, target) pair: the smallest that fits the memory and time budget (see ``codecs``).

Every candidate is round-tripped (decode(base, delta) == target sha256, streamed through the
agent's own decoder) before it can win; a pair where no delta beats the full artifact (the
compressed model) ends in ``failed`` with the reason, and the daemon then sends the full
artifact.

The builder's pairs in progress and its failures live in its memory (a restart tries them
again); it mirrors them to ``BUILDS_FILE`` in its work directory after every change, so that
``fleetctl delta list`` and ``GET /api/v1/deltas`` can say "building" or "failed, because".
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from deltafleet.shared import atomic_write_json, sha256_file

from .codecs import DEFAULT_MEMORY_BUDGET_BYTES, DEFAULT_TIME_BUDGET_S, Attempt, Budget, choose

log = logging.getLogger(__name__)

BUILDS_FILE = "delta-builds.json"  # {"building": [{base, target}], "failed": [{..., reason, at}]}


@dataclass(frozen=True, slots=True)
class BuiltDelta:
    base_sha256: str
    target_sha256: str
    codec: str
    path: Path  # temp file holding the delta, to be moved into the blob store
    sha256: str
    size_bytes: int
    build_seconds: float
    attempts: tuple[Attempt, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class NoDelta:
    """No codec produced a verified delta smaller than the full artifact: send that."""

    reason: str


def build_best_delta(
    base_path: str,
    target_path: str,
    target_sha256: str,
    out_dir: str,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    reference_bytes: int | None = None,
) -> BuiltDelta | NoDelta:
    """Worker-process entry point: the verified delta, or NoDelta when the full model should
    be sent.
    ``reference_bytes``: the size of the target's full artifact, when known (see ``choose``)."""
    t0 = time.perf_counter()
    choice = choose(
        Path(base_path),
        Path(target_path),
        Path(out_dir),
        budget=Budget(memory_budget_bytes, time_budget_s),
        target_sha256=target_sha256,
        reference_bytes=reference_bytes,
    )
    if choice.codec is None or choice.path is None or choice.size_bytes is None:
        return NoDelta(choice.reason)
    return BuiltDelta(sha256_file(Path(base_path)), target_sha256, choice.codec, choice.path,
                      sha256_file(choice.path), choice.size_bytes, time.perf_counter() - t0,
                      tuple(choice.attempts))


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: a worker must not outlive a server that was killed (SIGKILL leaves
    no chance to shut the pool down)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class DeltaBuilder:
    """Submits builds to a process pool and hands back the finished ones (one per pair)."""

    def __init__(
        self,
        work_dir: Path,
        max_workers: int = 1,
        *,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    ) -> None:
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.memory_budget_bytes = memory_budget_bytes
        self.time_budget_s = time_budget_s
        self._pool = cf.ProcessPoolExecutor(
            max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_exit_with_parent, initargs=(os.getpid(),),
        )
        self._futures: dict[tuple[str, str], cf.Future[BuiltDelta | NoDelta]] = {}
        self.failed: dict[tuple[str, str], str] = {}
        self._failed_at: dict[tuple[str, str], str] = {}
        self._publish()

    def _publish(self) -> None:
        """Mirror the pairs building and failed to ``BUILDS_FILE`` (a failed write is logged:
        the listing is for operators, the builder goes on)."""
        doc = {"building": [{"base_sha256": b, "target_sha256": t} for b, t in self._futures],
               "failed": [{"base_sha256": b, "target_sha256": t, "reason": reason,
                           "at": self._failed_at.get((b, t))}
                          for (b, t), reason in self.failed.items()]}
        try:
            atomic_write_json(self.work_dir / BUILDS_FILE, doc)
        except OSError as e:
            log.warning("cannot record the delta builds in %s: %s", self.work_dir, e)

    def _fail(self, key: tuple[str, str], reason: str) -> None:
        self.failed[key] = reason
        self._failed_at[key] = datetime.now(UTC).isoformat()

    def building(self, base: str, target: str) -> bool:
        return (base, target) in self._futures

    def submit(self, base: str, base_path: Path, target: str, target_path: Path, *,
               reference_bytes: int | None = None) -> None:
        """Build a delta for the pair unless one is building or failed. ``reference_bytes``:
        the size of the target's full artifact, a delta has to beat it (computed if None)."""
        key = (base, target)
        if key in self._futures or key in self.failed:
            return
        log.info("building delta %s -> %s", base[:12], target[:12])
        self._futures[key] = self._pool.submit(
            build_best_delta, str(base_path), str(target_path), target, str(self.work_dir),
            self.memory_budget_bytes, self.time_budget_s, reference_bytes,
        )
        self._publish()

    def finished(self) -> list[BuiltDelta]:
        done: list[BuiltDelta] = []
        changed = False
        for key, fut in list(self._futures.items()):
            if not fut.done():
                continue
            del self._futures[key]
            changed = True
            try:
                result = fut.result()
            except Exception as e:  # noqa: BLE001 - a failed build means "send the full model"
                log.error("delta %s -> %s failed: %s", key[0][:12], key[1][:12], e)
                self._fail(key, str(e))
                continue
            if isinstance(result, NoDelta):
                log.info("no delta for %s -> %s, the full model will be sent: %s",
                         key[0][:12], key[1][:12], result.reason)
                self._fail(key, result.reason)
            else:
                done.append(result)
        if changed:
            self._publish()
        return done

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
