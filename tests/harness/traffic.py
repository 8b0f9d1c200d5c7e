"""Inference traffic against an agent's local API while something else happens (a hot swap, a
rollout): threads that predict in a loop and record which version answered, or what failed."""

from __future__ import annotations

import threading
from types import TracebackType

import numpy as np

from deltafleet.agent.client import AgentClient


class PredictTraffic:
    """``with PredictTraffic(port, threads=3) as t: ...`` then ``t.answered`` (versions, in
    order of answer) and ``t.failures``; leaving the block stops and joins the threads. Each
    request is one row: of ``rows`` in turn when given, else ones of ``input_dim``."""

    def __init__(self, port: int, *, threads: int = 2, model: str = "detector",
                 input_dim: int = 64, rows: np.ndarray | None = None) -> None:
        self.port, self.model = port, model
        self.rows = (np.ones((1, input_dim), np.float32) if rows is None
                     else rows.astype(np.float32))
        self.answered: list[str | None] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        with AgentClient(port=self.port) as c:
            i = 0
            while not self._stop.is_set():
                try:
                    x = self.rows[i % len(self.rows)][None, :]
                    self.answered.append(c.predict(self.model, x).version)
                except BaseException as e:  # noqa: BLE001 - every failure is the test's finding
                    self.failures.append(e)
                i += 1

    def __enter__(self) -> PredictTraffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
