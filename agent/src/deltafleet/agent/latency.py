"""Paired latency probes for the trial: the previous and the new model, back to back on the
same inputs, so both calls of a pair see the same CPU load (the verdict is ``trial.evaluate``).

Each pair runs the two models one right after the other on one golden (or zero) input,
alternating which model goes first so neither profits from running second (caches, clock
ramp-up). Only ``model.run`` is timed; the answers are checked afterwards. A pair where
either call fails is dropped from the latency figures; every call of the new model is handed
to ``on_new`` (the trial counts it as a request, and a failure as an error).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

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


def output_agreement(old: LoadedModel, new: LoadedModel,
                     feeds_list: list[dict[str, Any]]) -> int | None:
    """How far the new version's answers agree with the previous one's on the same inputs, in
    parts per million of the compared values: per output, the share of rows whose top class
    (argmax over the last axis) is the same, for float outputs with more than one class; else
    the share of values within ``isclose`` (rtol 1e-3). None when no input ran on both."""
    import numpy as np

    agree = total = 0.0
    for feeds in feeds_list:
        try:
            a, b = old.run(feeds), new.run(feeds)
        except ModelRuntimeError:
            continue
        for name in a.keys() & b.keys():
            x, y = np.asarray(a[name]), np.asarray(b[name])
            if x.shape != y.shape or x.size == 0:
                total += 1
                continue
            if x.dtype.kind == "f" and x.ndim >= 1 and x.shape[-1] > 1:
                same = np.argmax(x, axis=-1) == np.argmax(y, axis=-1)
            else:
                same = np.isclose(x, y, rtol=1e-3, atol=1e-6)
            agree += float(np.mean(same))
            total += 1
    return None if not total else int(round(1_000_000 * agree / total))


def _batch(feeds: dict[str, Any]) -> int | None:
    for v in feeds.values():
        shape = getattr(v, "shape", ())
        return int(shape[0]) if shape else None
    return None
