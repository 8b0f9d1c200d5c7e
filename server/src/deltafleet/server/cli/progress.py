"""Progress of long fleetctl work: a live view on a terminal, plain lines when piped.

Two kinds of work show progress:

rollouts (``rollout model --wait``, ``rollout status --watch``): ``follow`` polls the
    rollout. On a terminal it keeps a rich ``Live`` view up to date (rich is imported only
    then); when the stream is not a terminal it prints exactly one line per change, stamped
    with the UTC time, flushed as it is written and free of ANSI codes::

        05:12:03 rollout 4 running wave 1/3: 12 healthy 3 downloading 1 failed, 4.2 MiB sent

    A change is any difference in that line (state, wave, devices by state, bytes sent).
local jobs (``delta build``, ``model add``): ``Steps`` on stderr. On a terminal a transient
    bar (bytes when the step knows its size, elapsed time); piped, one line per finished step
    with its size and time, and a "still ..." line every ``HEARTBEAT_S`` while a step runs.

The functions that build lines and views (``rollout_line``, ``rollout_view``, ``states_text``,
``Steps.line``) are pure, so tests check them without a terminal.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from ._common import fmt_bytes

# The order devices are counted in: done first, then in progress, then the ones in trouble.
STATE_ORDER = ("healthy", "trial", "applying", "downloading", "notified", "pending",
               "held", "failed", "rejected", "rolled_back", "reverting", "reverted",
               "skipped", "cancelled")
HEARTBEAT_S = 10.0
PROBLEM_STATES = frozenset({"held", "failed", "rejected", "rolled_back"})


def clock(now: datetime | None = None) -> str:
    """The stamp of a piped line: UTC wall time, ``HH:MM:SS``."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%H:%M:%S")


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or exotic stream: treat as a pipe
        return False


# -- rollouts ------------------------------------------------------------------------------

def wave_total(data: dict[str, Any]) -> int:
    """How many waves the rollout has: its policy's, else the highest wave a device is in."""
    from ..policy import RolloutPolicy  # noqa: PLC0415

    try:
        total = RolloutPolicy.from_json(data.get("policy") or {}).wave_count()
    except (TypeError, ValueError):
        total = 0
    seen = max((t["wave"] + 1 for t in data.get("targets", ())), default=0)
    return max(total, seen, data["current_wave"] + 1, 1)


def states_text(counts: dict[str, int]) -> str:
    """``12 healthy 3 downloading 1 failed`` in ``STATE_ORDER`` (unknown states last)."""
    order = {s: i for i, s in enumerate(STATE_ORDER)}
    keys = sorted((k for k, v in counts.items() if v), key=lambda k: (order.get(k, 99), k))
    return " ".join(f"{counts[k]} {k}" for k in keys) or "no devices"


def rollout_line(data: dict[str, Any]) -> str:
    """One rollout's progress as one line, without the time stamp."""
    line = (f"rollout {data['id']} {data['state']} wave {data['current_wave'] + 1}/"
            f"{wave_total(data)}: {states_text(data['counts'])}, "
            f"{fmt_bytes(data['bytes_sent'])} sent")
    if data.get("state_reason") and data["state"] != "running":
        line += f" ({data['state_reason']})"
    return line


def rollout_view(data: dict[str, Any], *, elapsed_s: float | None = None,
                 problems: int = 5) -> list[str]:
    """The live view of a rollout: head, each wave with its devices by state, bytes, and the
    last few devices in trouble with their reason. Needs ``data['targets']``."""
    head = (f"rollout {data['id']}: {data['model']} {data['version']} -> group "
            f"{data['group']}  {data['state']}  wave {data['current_wave'] + 1}/"
            f"{wave_total(data)}")
    if elapsed_s is not None:
        head += f"  ({int(elapsed_s) // 60:02d}:{int(elapsed_s) % 60:02d})"
    lines = [head]
    if data.get("state_reason"):
        lines.append(f"  {data['state_reason']}")
    by_wave: dict[int, dict[str, int]] = {}
    for t in data.get("targets", ()):
        counts = by_wave.setdefault(t["wave"], {})
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    for w in range(wave_total(data)):
        counts = by_wave.get(w, {})
        n = sum(counts.values())
        done = counts.get("healthy", 0)
        filled = round(20 * done / n) if n else 0
        lines.append(f"wave {w + 1:<3} [{'#' * filled}{'.' * (20 - filled)}] {done}/{n}  "
                     f"{states_text(counts) if n else 'no devices'}")
    lines.append(f"devices: {states_text(data['counts'])}")
    sent = f"sent {fmt_bytes(data['bytes_sent'])}"
    if data.get("full_bytes"):
        sent += (f" of {fmt_bytes(data['full_bytes'])} full "
                 f"({100 * data['bytes_sent'] / data['full_bytes']:.1f}%)")
    lines.append(sent)
    trouble = [t for t in data.get("targets", ()) if t["state"] in PROBLEM_STATES]
    trouble.sort(key=lambda t: t.get("updated_at") or "")
    for t in trouble[-problems:]:
        lines.append(f"  {t['device']} {t['state']}: {t.get('reason') or '-'}")
    return lines


@dataclass(frozen=True)
class Followed:
    data: dict[str, Any]
    timed_out: bool


def follow(fetch: Callable[[], dict[str, Any]], *, until: Callable[[dict[str, Any]], bool],
           view: Callable[[dict[str, Any], float], list[str]] | None = None,
           timeout_s: float | None = None, interval_s: float = 0.5,
           stream: TextIO | None = None, transient: bool = False,
           tty: bool | None = None) -> Followed:
    """Poll ``fetch()`` until ``until(data)`` or ``timeout_s``; show progress on ``stream``.

    On a terminal: a rich Live view of ``view(data, elapsed_s)`` (default ``rollout_view``),
    left on screen at the end unless ``transient``. Otherwise: ``rollout_line`` each time it
    changes, stamped and flushed. Returns the last data and whether the time ran out.
    """
    stream = stream or sys.stdout
    view = view or (lambda d, e: rollout_view(d, elapsed_s=e))
    tty = is_terminal(stream) if tty is None else tty
    start = time.monotonic()
    deadline = None if timeout_s is None else start + timeout_s
    data = fetch()

    def finished() -> bool | None:
        if until(data):
            return False
        if deadline is not None and time.monotonic() > deadline:
            return True
        return None

    if not tty:
        last = None
        while True:
            line = rollout_line(data)
            if line != last:
                try:
                    stream.write(f"{clock()} {line}\n")
                    stream.flush()
                except BrokenPipeError:  # the reader left (`| head`): stop quietly
                    _discard(stream)
                    return Followed(data, False)
                last = line
            ended = finished()
            if ended is not None:
                return Followed(data, ended)
            time.sleep(interval_s)
            data = fetch()

    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    def render() -> Text:
        return Text("\n".join(view(data, time.monotonic() - start)))

    console = Console(file=stream, highlight=False)
    with Live(render(), console=console, refresh_per_second=4, transient=transient) as live:
        while True:
            ended = finished()
            if ended is not None:
                live.update(render())
                return Followed(data, ended)
            time.sleep(interval_s)
            data = fetch()
            live.update(render())


def _discard(stream: TextIO) -> None:
    """Point ``stream``'s file at /dev/null, so nothing more (nor the flush at exit) fails."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


# -- local jobs ----------------------------------------------------------------------------

class Steps:
    """The steps of a local job on ``stream`` (stderr): a bar on a terminal, lines piped.

    ``start(label, total_bytes)`` begins a step, ``advance(n)`` counts bytes done in it,
    ``done(note)`` ends it: piped, that prints ``HH:MM:SS <what>: <note or label> (<s> s)``.
    ``enabled=False`` shows nothing. Use as a context manager (``close`` on exit).
    """

    def __init__(self, what: str, *, stream: TextIO | None = None, enabled: bool = True,
                 tty: bool | None = None, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = is_terminal(self.stream) if tty is None else tty
        self.heartbeat_s = heartbeat_s
        self.label: str | None = None
        self.started = 0.0
        self.silent = False
        self.job_started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Steps:
        if not self.enabled:
            return self
        if self.tty:
            from rich.console import Console  # noqa: PLC0415
            from rich.progress import (  # noqa: PLC0415
                BarColumn,
                DownloadColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                      BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                                      console=Console(file=self.stream, highlight=False),
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.what, total=None)
        else:
            self._beat = threading.Thread(target=self._heartbeat, daemon=True)
            self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self, text: str, elapsed_s: float | None = None) -> str:
        """A piped line (without its time stamp)."""
        return f"{self.what}: {text}" + ("" if elapsed_s is None else f" ({elapsed_s:.1f} s)")

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(f"{clock()} {text}\n")
            self.stream.flush()

    def start(self, label: str, total_bytes: int | None = None, *, silent: bool = False) -> None:
        """Begin a step (ending the current one); a ``silent`` step prints no line when it
        ends (it still shows on the bar and in heartbeats)."""
        if self.label is not None:
            self.done()
        self.label, self.started, self.silent = label, time.monotonic(), silent
        if self._progress is not None:
            self._progress.reset(self._task, total=total_bytes,
                                 description=f"{self.what}: {label}")

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, nbytes)

    def done(self, note: str | None = None) -> None:
        """End the current step; ``note`` (default: its label) says what it did."""
        if self.label is None:
            return
        text, elapsed = note or self.label, time.monotonic() - self.started
        self.label = None
        if self.enabled and not self.tty and (note is not None or not self.silent):
            self._write(self.line(text, elapsed))

    def note(self, text: str) -> None:
        """A line about the job as a whole (piped only), e.g. how it ended."""
        if self.enabled and not self.tty:
            self._write(self.line(text, time.monotonic() - self.job_started))

    def close(self) -> None:
        self._stop.set()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._beat is not None:
            self._beat.join(1)
            self._beat = None

    def _heartbeat(self) -> None:
        printed: tuple[str | None, float, int] = (None, 0.0, 0)
        while not self._stop.wait(min(1.0, self.heartbeat_s)):
            label, started = self.label, self.started
            if label is None:
                continue
            beats = int((time.monotonic() - started) // self.heartbeat_s)
            seen = printed[2] if printed[:2] == (label, started) else 0
            if beats > seen:
                self._write(f"{self.what}: still {label}, {beats * self.heartbeat_s:g} s")
                printed = (label, started, beats)


class CountingReader:
    """A binary file whose ``read`` reports the bytes it returns to ``on_bytes``."""

    def __init__(self, f: Any, on_bytes: Callable[[int], None]) -> None:
        self.f, self.on_bytes = f, on_bytes

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data:
            self.on_bytes(len(data))
        return data


__all__ = ["CountingReader", "Followed", "Steps", "clock", "follow",
           "rollout_line", "rollout_view", "states_text", "wave_total"]
