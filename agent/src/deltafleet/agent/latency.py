"""Paired latency probes for the trial: the previous and the new model, back to back on the
same inputs, so both calls of a pair see the same CPU load (the verdict is ``trial.evaluate``).

Each pair runs the two models one right after the other on one golden (or zero) input,
alternating which model goes first so neither profits from running second (caches, clock
ramp-up). Only ``model.run`` is timed; the answers are checked afterwards. A pair where
either call fails is dropped from the latency figures; every call of the new model is handed
to ``on_new`` (the trial counts it as a request, and a failure as an error).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ModelRuntimeError
from .runtime import LoadedModel
from .serving import check_outputs

REPEATS = 3  # calls of each model per pair; the pair keeps the fastest of each
_NONE = 2**62


def _timed(model: LoadedModel, feeds: dict[str, Any]) -> tuple[int, bool]:
    t0 = time.perf_counter()
    try:
        outputs = model.run(feeds)
    except ModelRuntimeError:
        return int((time.perf_counter() - t0) * 1e6), False
    us = int((time.perf_counter() - t0) * 1e6)
    try:
        check_outputs(model, outputs, _batch(feeds))
    except ModelRuntimeError:
        return us, False
    return us, True


def sample_pairs(old: LoadedModel, new: LoadedModel, feeds_list: list[dict[str, Any]], n: int,
                 *, budget_s: float, repeats: int = REPEATS,
                 on_new: Callable[[int, bool], None] | None = None) -> list[tuple[int, int]]:
    """Up to ``n`` ``(old_us, new_us)`` pairs on ``feeds_list`` (cycled), within ``budget_s``
    of wall time (at least one pair is always attempted after the warm-up pair).

    A pair is ``repeats`` alternating calls of each model on one input (old, new, old, new...
    or new, old, ... every other pair) and keeps the fastest call of each: a busy CPU only
    ever adds time to a call, so the fastest of a few interleaved calls is the one least
    disturbed, for both models alike."""
    if not feeds_list:
        # a caller's bug, not bad input: stays builtin (test_error_root)
        raise ValueError("no inputs to probe with")
    pairs: list[tuple[int, int]] = []
    deadline = time.monotonic() + budget_s
    for i in range(-1, n):  # i == -1: a warm-up pair, not measured
        feeds = feeds_list[max(i, 0) % len(feeds_list)]
        first, second = (old, new) if i % 2 == 0 else (new, old)
        best = {id(old): _NONE, id(new): _NONE}
        ok = True
        for _ in range(max(1, repeats)):
            for model in (first, second):
                us, good = _timed(model, feeds)
                if model is new and on_new is not None:
                    on_new(us, good)
                ok = ok and good
                best[id(model)] = min(best[id(model)], us)
        if i >= 0 and ok:
            pairs.append((best[id(old)], best[id(new)]))
        if i >= 0 and time.monotonic() > deadline:
            break
    return pairs


DEVIATION_RTOL = 1e-3  # non-classifier outputs: a value agrees within this relative deviation
DEVIATION_ATOL = 1e-6


def compare_outputs(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, int]:
    """(agreeing share summed over outputs, outputs compared) for one input: per output, the
    share of rows whose top class (argmax over the last axis) is the same for float outputs
    with more than one class (a classifier), else the share of values within
    ``DEVIATION_RTOL`` relative deviation. An output of another shape counts as disagreeing."""
    agree, total = 0.0, 0
    for name in a.keys() & b.keys():
        x, y = np.asarray(a[name]), np.asarray(b[name])
        total += 1
        if x.shape != y.shape or x.size == 0:
            continue
        if x.dtype.kind == "f" and x.ndim >= 1 and x.shape[-1] > 1:
            same = np.argmax(x, axis=-1) == np.argmax(y, axis=-1)
        else:
            same = np.isclose(x, y, rtol=DEVIATION_RTOL, atol=DEVIATION_ATOL)
        agree += float(np.mean(same))
    return agree, total


def output_agreement(old: LoadedModel, new: LoadedModel,
                     feeds_list: list[dict[str, Any]]) -> int | None:
    """How far the new version's answers agree with the previous one's on the same inputs, in
    parts per million of the compared values (``compare_outputs``). None when no input ran on
    both."""
    agree = total = 0.0
    for feeds in feeds_list:
        try:
            a, b = old.run(feeds), new.run(feeds)
        except ModelRuntimeError:
            continue
        got, n = compare_outputs(a, b)
        agree, total = agree + got, total + n
    return None if not total else int(round(1_000_000 * agree / total))


def recorded_agreement(new: LoadedModel, recorded: list[tuple[dict[str, Any], dict[str, Any]]]
                       ) -> tuple[float, int]:
    """Agreement of ``new`` with outputs the previous version gave on the same inputs before it
    was unloaded (a cold swap: both cannot be held), as (agreeing share sum, compared)."""
    agree, total = 0.0, 0
    for feeds, old_outputs in recorded:
        try:
            got, n = compare_outputs(old_outputs, new.run(feeds))
        except ModelRuntimeError:
            continue
        agree, total = agree + got, total + n
    return agree, total


SHADOW_SAMPLE_RATE = 0.25  # share of live trial requests also run on the previous model
SHADOW_QUEUE = 16  # sampled requests waiting for the shadow thread; more are dropped


class Shadow:
    """The agreement gate's shadow: a sample of live requests answered by the new version is
    run again on the previous one, on a background thread at low priority, and the two answers
    are compared (``compare_outputs``).

    ``offer`` is what the request path calls after it has its answer: it never waits, never
    runs a model and never raises. It takes every k-th request (k = 1 / ``rate``) into a
    bounded queue and drops the sample when the queue is full, so a slow previous model or a
    busy CPU costs samples, never latency."""

    def __init__(self, old: LoadedModel, *, rate: float = SHADOW_SAMPLE_RATE,
                 queue_size: int = SHADOW_QUEUE, name: str = "shadow") -> None:
        self.old = old
        self.every = max(1, round(1 / rate)) if rate > 0 else 0
        self._queue: queue.Queue[tuple[dict[str, Any], dict[str, Any]] | None] = (
            queue.Queue(maxsize=max(1, queue_size)))
        self._lock = threading.Lock()
        self._seen = 0
        self.agree = 0.0  # agreeing share, summed over compared outputs
        self.compared = 0  # outputs compared
        self.samples = 0  # requests compared
        self.dropped = 0  # sampled but the queue was full
        self.failed = 0  # the previous model raised on the sample
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def offer(self, feeds: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Called on the request path with the new version's answer; returns at once."""
        try:
            with self._lock:
                self._seen += 1
                take = self.every and self._seen % self.every == 0
            if not take:
                return
            sample = ({k: np.array(v, copy=True) for k, v in feeds.items()}, dict(outputs))
            self._queue.put_nowait(sample)
        except queue.Full:
            with self._lock:
                self.dropped += 1
        except Exception:  # noqa: BLE001 - the request path never fails for the shadow
            return

    def _work(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # low priority (per-thread nice)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            try:
                self._compare(*item)
            finally:
                self._queue.task_done()

    def _compare(self, feeds: dict[str, Any], new_outputs: dict[str, Any]) -> None:
        try:
            old_outputs = self.old.run(feeds)
        except Exception:  # noqa: BLE001 - a failing previous model is not the new one's fault
            with self._lock:
                self.failed += 1
            return
        got, n = compare_outputs(old_outputs, new_outputs)
        with self._lock:
            self.agree += got
            self.compared += n
            self.samples += 1

    def counts(self) -> tuple[float, int, int]:
        """(agreeing share sum, outputs compared, requests compared) so far."""
        with self._lock:
            return self.agree, self.compared, self.samples

    def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Let queued samples finish (the trial's end asks before it judges)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        """End the thread (queued samples are abandoned); the caller closes the model."""
        with self._lock:
            self.every = 0  # no more samples
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1.0)
        self._thread.join(timeout=5.0)


def _batch(feeds: dict[str, Any]) -> int | None:
    for v in feeds.values():
        shape = getattr(v, "shape", ())
        return int(shape[0]) if shape else None
    return None
