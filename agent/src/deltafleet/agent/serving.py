"""What the device serves: one slot per model name, hot-swapped without failing a request.

A slot holds the primary session (a loaded model + its version) and an optional fallback model.
Requests take a reference to the current session under a short lock and run outside it, so
the swap itself is a pointer flip:

    warm swap (memory holds both):  load + validate + warm up new  ->  flip under lock  ->
                                    wait for in-flight requests on old  ->  close old
    cold swap (memory does not):    hold new requests  ->  drain + close old  ->  load new  ->
                                    flip  ->  release the held requests

A held request waits (up to ``hold_timeout_s``), it is never failed because of a swap. When the
primary is missing or raises, the fallback model answers and the response says so.

Every primary request is counted on its session (requests, errors, latency samples) so the
trial can judge a new version on live traffic; during a trial with an agreement gate each
answer is also offered to the session's shadow (``latency.Shadow``: a bounded, sampled queue
the previous model works off the request path); the last N results go to a ring buffer.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deltafleet.shared import GoldenInput, IoSignature, TensorSpec, WireError

from .errors import GoldenInputInvalid, ModelRuntimeError
from .runtime import LoadedModel, load_model, zero_feeds

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 20_000


class ModelUnavailable(ModelRuntimeError):
    """No primary and no fallback can answer for this model right now."""


class BadRequest(ModelRuntimeError):
    """The caller's input does not fit the model (unknown model, wrong input names)."""


@dataclass
class SessionStats:
    """Request figures of one session; appended by request threads, read by the trial."""

    requests: int = 0
    errors: int = 0
    latencies_us: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, latency_us: int, ok: bool) -> None:
        with self.lock:
            self.requests += 1
            if ok:
                self.latencies_us.append(latency_us)
            else:
                self.errors += 1

    def snapshot(self) -> tuple[int, int, list[int]]:
        with self.lock:
            return self.requests, self.errors, list(self.latencies_us)


class Session:
    """A loaded model plus the version it is, its in-flight count and its stats."""

    def __init__(self, model: LoadedModel, version: str, sha256: str) -> None:
        self.model = model
        self.version = version
        self.sha256 = sha256
        self.stats = SessionStats()
        # the agreement gate's shadow during this session's trial (``latency.Shadow.offer``):
        # handed each answer it gives; it returns at once and never raises
        self.shadow: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None] | None = None
        self._inflight = 0
        self._cond = threading.Condition()

    def enter(self) -> None:
        with self._cond:
            self._inflight += 1

    def leave(self) -> None:
        with self._cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._cond.notify_all()

    def drain_and_close(self, timeout_s: float = 30.0) -> None:
        """Wait for requests already running on this session, then free it."""
        with self._cond:
            self._cond.wait_for(lambda: self._inflight == 0, timeout_s)
        self.model.close()


@dataclass(frozen=True, slots=True)
class Prediction:
    model: str
    version: str | None  # version of the primary that answered; None when the fallback did
    sha256: str | None
    fallback: str | None  # name of the fallback that answered, else None
    outputs: dict[str, np.ndarray]
    latency_us: int
    primary_error: str | None = None  # why the primary did not answer, when the fallback did


def input_digest(feeds: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(feeds):
        a = np.ascontiguousarray(feeds[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_outputs(model: LoadedModel, outputs: dict[str, np.ndarray],
                  batch: int | None = None) -> None:
    """An answer is an error when an output is missing, non-finite or of the wrong shape."""
    for spec in model.outputs:
        if spec.name not in outputs:
            raise ModelRuntimeError(f"output {spec.name!r} is missing")
        value = np.asarray(outputs[spec.name])
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            raise ModelRuntimeError(f"output {spec.name!r} has NaN or Inf values")
        if spec.shape and value.ndim != len(spec.shape):
            raise ModelRuntimeError(f"output {spec.name!r} has rank {value.ndim}, "
                                    f"declared {len(spec.shape)}")
        for got, want in zip(value.shape, spec.shape, strict=False):
            if want is not None and got != want:
                raise ModelRuntimeError(f"output {spec.name!r} has shape {value.shape}, "
                                        f"declared {spec.shape}")
        if batch is not None and spec.shape and spec.shape[0] is None and value.shape[0] != batch:
            raise ModelRuntimeError(f"output {spec.name!r} has batch {value.shape[0]}, "
                                    f"input had {batch}")


def io_signature(model: LoadedModel) -> dict[str, Any]:
    """The wire form of ``model.signature`` (kept for callers that compare dicts)."""
    return model.signature.to_wire()


def _signature(sig: IoSignature | dict[str, Any]) -> IoSignature:
    return sig if isinstance(sig, IoSignature) else IoSignature.from_wire(sig)


def io_difference(a: IoSignature | dict[str, Any], b: IoSignature | dict[str, Any]) -> str | None:
    """The first line of ``a.diff(b)``, or None if the signatures match."""
    diff = _signature(a).diff(_signature(b))
    return diff[0] if diff else None


def golden_feeds(golden: GoldenInput) -> dict[str, np.ndarray]:
    """A golden sample as the model's feeds (read-only arrays over the decoded bytes)."""
    return {t.name: np.frombuffer(t.data, dtype=np.dtype(t.dtype)).reshape(t.shape)
            for t in golden.tensors}


def decode_golden(golden: tuple[GoldenInput | dict[str, Any], ...]) -> list[dict[str, np.ndarray]]:
    """Feeds for every golden sample, from their wire form (or typed). GoldenInputInvalid (a
    ValueError, one line) for a sample that does not decode."""
    feeds_list = []
    for item in golden:
        try:
            sample = item if isinstance(item, GoldenInput) else GoldenInput.from_wire(item)
        except WireError as e:
            raise GoldenInputInvalid(str(e)) from e
        feeds_list.append(golden_feeds(sample))
    return feeds_list


def probe_feeds(model: LoadedModel, golden: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Inputs for warm-up and trial probes: the manifest's golden inputs, else zeros."""
    return golden or [zero_feeds(model)]


class Slot:
    """One served model name: current primary session, optional fallback, swap machinery."""

    def __init__(self, name: str, hold_timeout_s: float = 30.0) -> None:
        self.name = name
        self.session: Session | None = None
        self.fallback: LoadedModel | None = None
        self.fallback_name: str | None = None
        self.hold_timeout_s = hold_timeout_s
        self._lock = threading.Lock()
        self._open = threading.Event()  # cleared while a cold swap has no model loaded
        self._open.set()
        self.swaps = 0
        self.last_inputs: tuple[TensorSpec, ...] = ()  # of the last primary, kept across a gap

    def acquire(self) -> Session | None:
        """The current session, entered; during a cold-swap gap, wait for the new one (up to
        ``hold_timeout_s``). None when there is no primary (the caller tries the fallback)."""
        deadline = time.monotonic() + self.hold_timeout_s
        while True:
            with self._lock:
                s = self.session
                if s is not None:
                    s.enter()
                    return s
                in_gap = not self._open.is_set()
            remaining = deadline - time.monotonic()
            if not in_gap:
                return None
            if remaining <= 0:
                log.warning("%s: request held %.0f s by a swap", self.name, self.hold_timeout_s)
                return None
            self._open.wait(remaining)

    def flip(self, new: Session | None) -> Session | None:
        """Make ``new`` current; returns the old session (still open; caller drains it)."""
        with self._lock:
            old, self.session = self.session, new
            self.swaps += 1
            if new is not None:
                self.last_inputs = new.model.inputs
        return old

    def close_gap(self) -> None:
        self._open.clear()

    def open_gap(self) -> None:
        self._open.set()


class Serving:
    """All slots and the results ring buffer; thread-safe for request threads."""

    def __init__(self, *, results_size: int = 100, hold_timeout_s: float = 30.0) -> None:
        self.slots: dict[str, Slot] = {}
        self.results: deque[dict[str, Any]] = deque(maxlen=max(1, results_size))
        self._results_lock = threading.Lock()
        self.hold_timeout_s = hold_timeout_s
        self._slots_lock = threading.Lock()

    def slot(self, name: str) -> Slot:
        with self._slots_lock:
            s = self.slots.get(name)
            if s is None:
                s = self.slots[name] = Slot(name, self.hold_timeout_s)
            return s

    # -- model management (agent thread) ---------------------------------------------------
    def set_fallback(self, name: str, path: Path, fmt: str | None = None) -> None:
        fmt = fmt or path.suffix.lstrip(".")
        model = load_model(path, fmt)
        slot = self.slot(name)
        old, slot.fallback, slot.fallback_name = slot.fallback, model, path.name
        if old is not None:
            old.close()

    def install(self, name: str, model: LoadedModel, version: str, sha256: str) -> Session:
        """Warm path: ``model`` is loaded and warmed; flip to it, drain and close the old."""
        new = Session(model, version, sha256)
        old = self.slot(name).flip(new)
        if old is not None:
            old.drain_and_close()
        return new

    def install_cold(self, name: str, loader: Callable[[], LoadedModel], version: str,
                     sha256: str) -> Session:
        """Cold path: hold requests, free the old model, load the new one, release requests.

        When the new model does not load, the old one is loaded again by the caller's
        ``loader`` contract: here the exception propagates with the slot reopened and empty
        (the fallback answers) so the caller can restore the previous version.
        """
        slot = self.slot(name)
        slot.close_gap()
        try:
            old = slot.flip(None)
            if old is not None:
                old.drain_and_close()
            model = loader()
            new = Session(model, version, sha256)
            slot.flip(new)
            return new
        finally:
            slot.open_gap()

    def current(self, name: str) -> Session | None:
        s = self.slots.get(name)
        return s.session if s else None

    def close(self) -> None:
        for slot in self.slots.values():
            s = slot.flip(None)
            if s is not None:
                s.model.close()
            if slot.fallback is not None:
                slot.fallback.close()

    # -- requests (any thread) -------------------------------------------------------------
    def predict(self, name: str, feeds: dict[str, np.ndarray], *, record: bool = True) -> Prediction:
        slot = self.slots.get(name)
        if slot is None:
            raise BadRequest(f"no model named {name!r}")
        t0 = time.perf_counter()
        session = slot.acquire()
        primary_error: str | None = None
        if session is not None:
            try:
                t_run = time.perf_counter()
                try:
                    outputs = session.model.run(feeds)
                    batch = _batch_of(feeds)
                    check_outputs(session.model, outputs, batch)
                except ModelRuntimeError as e:
                    session.stats.record(int((time.perf_counter() - t_run) * 1e6), False)
                    primary_error = str(e)
                else:
                    session.stats.record(int((time.perf_counter() - t_run) * 1e6), True)
                    shadow = session.shadow
                    if shadow is not None:
                        shadow(feeds, outputs)
                    p = Prediction(name, session.version, session.sha256, None, outputs,
                                   int((time.perf_counter() - t0) * 1e6))
                    if record:
                        self._remember(p, feeds)
                    return p
            finally:
                session.leave()
        else:
            primary_error = "no primary model loaded"
        fb = slot.fallback
        if fb is None:
            raise ModelUnavailable(f"{name}: {primary_error}; no fallback configured")
        try:
            outputs = fb.run(feeds)
        except ModelRuntimeError as e:
            raise ModelUnavailable(f"{name}: {primary_error}; fallback failed too: {e}") from e
        p = Prediction(name, None, None, slot.fallback_name, outputs,
                       int((time.perf_counter() - t0) * 1e6), primary_error)
        if record:
            self._remember(p, feeds)
        return p

    def _remember(self, p: Prediction, feeds: dict[str, np.ndarray]) -> None:
        entry = {
            "at": time.time(), "model": p.model, "version": p.version, "fallback": p.fallback,
            "input_sha256": input_digest(feeds), "latency_us": p.latency_us,
            "outputs": {k: _small(v) for k, v in p.outputs.items()},
        }
        with self._results_lock:
            self.results.append(entry)

    def last_results(self, name: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        with self._results_lock:
            items = [r for r in self.results if name is None or r["model"] == name]
        return items[-limit:] if limit else items


def _batch_of(feeds: dict[str, np.ndarray]) -> int | None:
    for v in feeds.values():
        a = np.asarray(v)
        return int(a.shape[0]) if a.ndim else None
    return None


def _small(a: np.ndarray, limit: int = 4096) -> Any:
    """Outputs as JSON values; large tensors are summarised, not stored whole."""
    a = np.asarray(a)
    if a.size <= limit:
        return a.tolist()
    return {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": hashlib.sha256(
        np.ascontiguousarray(a).tobytes()).hexdigest()}
