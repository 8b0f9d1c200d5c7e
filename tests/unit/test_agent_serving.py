"""Hot swap, hold during a cold swap, fallback and the results cache, with real ONNX Runtime
sessions and concurrent request threads (no broker, no agent process)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deltafleet.agent.runtime import load_model
from deltafleet.agent.serving import (
    ModelUnavailable,
    Serving,
    io_difference,
    io_signature,
)
from tests.harness import modelgen

X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return modelgen.make_onnx_pair(tmp_path_factory.mktemp("serving"), size_mb=0.3)


class Load:
    """Request threads hammering one model; ``served[i]``: requests thread ``i`` has answered."""

    def __init__(self, serving: Serving, threads: int) -> None:
        self.serving, self.stop = serving, threading.Event()
        self.seen: list = []
        self.failures: list = []
        self.served = [0] * threads
        self.answered = threading.Condition()
        self.workers = [threading.Thread(target=self.hammer, args=(i,)) for i in range(threads)]

    def hammer(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                self.seen.append(self.serving.predict("m", {"input": X}, record=False).version)
            except BaseException as e:  # noqa: BLE001
                self.failures.append(e)
            else:
                with self.answered:
                    self.served[i] += 1
                    self.answered.notify_all()

    def each_answers(self, more: int, what: str) -> None:
        """Until every thread has answered ``more`` further requests (or one failed)."""
        with self.answered:
            want = [n + more for n in self.served]
            assert self.answered.wait_for(
                lambda: self.failures or all(n >= k for n, k in zip(self.served, want, strict=True)),
                30), \
                f"request threads did not answer {what} within 30 s: {self.served}"


def run_load(serving: Serving, action, threads: int = 4) -> tuple[list, list]:
    load = Load(serving, threads)
    for w in load.workers:
        w.start()
    try:
        load.each_answers(1, "before the action")
        action()
        # two more each: a request begun before the action ended, then one begun after it
        load.each_answers(2, "after the action")
    finally:
        load.stop.set()
        for w in load.workers:
            w.join()
    return load.seen, load.failures


def test_warm_swaps_under_load_fail_no_request_and_close_the_old_session(pair):
    v1, v2 = pair
    serving = Serving()
    first = serving.install("m", load_model(v1, "onnx"), "v1", "a" * 64)
    sessions = [first]

    def swaps() -> None:
        for i in range(6):
            path, version = (v2, "v2") if i % 2 == 0 else (v1, "v1")
            sessions.append(serving.install("m", load_model(path, "onnx"), version, "b" * 64))

    seen, failures = run_load(serving, swaps)
    assert not failures
    assert {"v1", "v2"} <= set(seen)
    assert all(s.model._session is None for s in sessions[:-1])  # old sessions were closed
    assert serving.current("m").version == "v1"


def test_cold_swap_holds_requests_instead_of_failing_them(pair):
    v1, v2 = pair
    serving = Serving(hold_timeout_s=10)
    serving.install("m", load_model(v1, "onnx"), "v1", "a" * 64)

    def slow_loader():
        # deliberate: a slow load, so requests arrive while no model is loaded and are held
        time.sleep(0.3)
        return load_model(v2, "onnx")

    seen, failures = run_load(serving, lambda: serving.install_cold("m", slow_loader, "v2", "b" * 64))
    assert not failures
    assert seen[-1] == "v2" and "v1" in seen


def test_fallback_answers_when_no_primary_is_loaded(pair, tmp_path: Path):
    v1, _ = pair
    serving = Serving()
    with pytest.raises(ModelUnavailable):
        serving.slot("m")
        serving.predict("m", {"input": X})
    serving.set_fallback("m", v1)
    p = serving.predict("m", {"input": X})
    assert p.version is None and p.fallback == v1.name
    assert p.primary_error == "no primary model loaded"


def test_results_cache_keeps_the_last_n_with_input_hash_and_version(pair):
    v1, _ = pair
    serving = Serving(results_size=3)
    serving.install("m", load_model(v1, "onnx"), "v1", "a" * 64)
    for i in range(5):
        serving.predict("m", {"input": X * i})
    last = serving.last_results("m")
    assert len(last) == 3
    assert {r["version"] for r in last} == {"v1"}
    assert len({r["input_sha256"] for r in last}) == 3
    assert np.asarray(last[-1]["outputs"]["output"]).shape == (1, 10)
    assert serving.last_results("m", limit=1) == last[-1:]


def test_io_difference_names_the_changed_input(pair, tmp_path: Path):
    v1, v2 = pair
    narrow = modelgen.make_onnx_model(tmp_path / "narrow.onnx", size_mb=0.1, input_dim=32)
    with load_model(v1, "onnx") as a, load_model(v2, "onnx") as b, load_model(narrow, "onnx") as c:
        assert io_difference(io_signature(a), io_signature(b)) is None
        assert "input 'input' shape" in io_difference(io_signature(c), io_signature(a))
