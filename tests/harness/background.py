"""A daemon thread doing one small job over and over (sampling a process, draining a client)
until ``stop()``: the loop the test and benchmark samplers share."""

from __future__ import annotations

import threading


class Background:
    """Subclasses define ``step()`` (return False to end the loop) and may set
    ``interval_s`` (a pause between steps that ``stop()`` cuts short); ``start()`` begins."""

    interval_s = 0.0

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def step(self) -> bool | None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.step() is False:
                return
            if self.interval_s:
                self._stop.wait(self.interval_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
