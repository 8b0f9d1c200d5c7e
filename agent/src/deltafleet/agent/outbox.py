"""Store-and-forward outbox: every report is on disk before anyone tries to send it, and stays
there until the server says it has it.

Layout: ``outbox/<seq:012d>.json`` = ``{"id", "topic", "payload" (utf-8 text), "created_at"}``,
written with the durable helper (temp + fsync + rename + fsync dir).

Two acknowledgements: the broker's PUBACK (QoS 1) only says the broker took the message. A
broker that crashes, or has no subscriber yet because the server has not re-subscribed after
a restart, drops it after that PUBACK. So an entry is deleted only on the server's own ack
(``{prefix}/dev/{id}/ack``, see ``messages.Ack``), which the server publishes after the
database transaction that recorded the event commits, for duplicates too.

A sender thread publishes, oldest first, the entries that are due, at most ``max_in_flight``
sent-but-unacked entries at a time (the oldest ones). An entry sent and not acked is due again
after ``resend_after_s`` doubled per try up to ``max_resend_s`` (jittered), so a server that
never acks (an old server) sees each entry at most every few minutes. A (re)connect or the
server coming online (``resend_all``) makes every entry due at once: that is when a lost
message is most likely. A publish without PUBACK (transport failure) is retried with
exponential backoff and full jitter. Delivery is at-least-once with the message's stable id
(the event's ``event_id``): the server applies each id once and acks it every time.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from deltafleet.shared import atomic_write_json

log = logging.getLogger(__name__)


class Publisher(Protocol):
    def is_connected(self) -> bool: ...

    def publish_acked(self, topic: str, payload: bytes, timeout_s: float) -> None: ...


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**attempt)), never below a tenth of base."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return max(base_s / 10, (rng or random).uniform(0, ceiling))


def resend_delay_s(tries: int, base_s: float, cap_s: float,
                   rng: random.Random | None = None) -> float:
    """How long a sent entry waits for the server's ack before it is sent again: base doubled
    per earlier try, capped, with jitter in [half, full] (never an immediate re-send)."""
    ceiling = min(cap_s, base_s * (2 ** min(max(tries - 1, 0), 30)))
    return ceiling * (rng or random).uniform(0.5, 1.0)


class Outbox:
    def __init__(self, directory: Path, publisher: Publisher, *, base_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, max_messages: int = 10_000,
                 ack_timeout_s: float = 10.0, resend_after_s: float = 5.0,
                 max_resend_s: float = 300.0, max_in_flight: int = 64) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        self.publisher = publisher
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_messages = max_messages
        self.ack_timeout_s = ack_timeout_s  # PUBACK wait
        self.resend_after_s = resend_after_s  # server-ack wait before the first re-send
        self.max_resend_s = max_resend_s
        self.max_in_flight = max(1, max_in_flight)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        existing = self._files()
        self._seq = int(existing[-1].stem) if existing else 0
        # id -> file, oldest first; entries whose file does not parse are sent as "unreadable"
        # and deleted by the sender
        self._entries: dict[str, Path] = {}
        for f in existing:
            self._entries[str(self._read(f).get("id") or f.name)] = f
        self._due: dict[str, float] = {}  # id -> monotonic time it may be sent again
        self._tries: dict[str, int] = {}  # id -> sends since the last resend_all()
        self.sent = 0  # publishes the broker acknowledged (first sends and re-sends)
        self.resent = 0
        self.acked = 0  # entries deleted on the server's ack

    def _files(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.json") if p.stem.isdigit())

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def put(self, message_id: str, topic: str, payload: bytes) -> bool:
        """Persist one message; a second put of the same id while it waits is a no-op."""
        with self._lock:
            if message_id in self._entries:
                return False
            if len(self._entries) >= self.max_messages:
                log.warning("outbox full (%d): dropping the oldest message", len(self._entries))
                oldest = next(iter(self._entries))
                self._forget(oldest).unlink(missing_ok=True)
            self._seq += 1
            path = self.dir / f"{self._seq:012d}.json"
            atomic_write_json(path, {
                "id": message_id, "topic": topic, "payload": payload.decode(),
                "created_at": time.time()})
            self._entries[message_id] = path
        self._wake.set()
        return True

    def _forget(self, message_id: str) -> Path:
        self._due.pop(message_id, None)
        self._tries.pop(message_id, None)
        return self._entries.pop(message_id)

    def ack(self, message_ids: Iterable[str]) -> int:
        """The server recorded these ids: delete their entries. Unknown ids (acked before, or
        never ours) are ignored. Returns how many entries were deleted. The deletion needs no
        fsync: an entry that reappears after a power cut is sent, deduplicated and acked again."""
        with self._lock:
            done = self._delete(message_ids)
            self.acked += done
        if done:
            self._wake.set()  # the in-flight window may have room now
        return done

    def discard(self, message_ids: Iterable[str]) -> int:
        """Delete waiting entries the agent itself superseded (a telemetry summary replaced by
        a newer one before the server acked it); not counted as acked."""
        with self._lock:
            return self._delete(message_ids)

    def _delete(self, message_ids: Iterable[str]) -> int:
        """Delete the entries of these ids that exist (the lock held); how many."""
        done = 0
        for mid in message_ids:
            if mid in self._entries:
                self._forget(mid).unlink(missing_ok=True)
                done += 1
        return done

    def resend_all(self) -> None:
        """Make every waiting entry due now (on a (re)connect, or when the server comes online:
        what was sent before may have been lost by the broker or by nobody listening)."""
        with self._lock:
            self._due.clear()
            self._tries.clear()
        self._wake.set()

    def pending(self) -> int:
        return len(self._entries)

    def pending_ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _window(self) -> list[tuple[str, Path]]:
        with self._lock:
            return list(itertools.islice(self._entries.items(), self.max_in_flight))

    def next_due_in_s(self) -> float | None:
        """Seconds until the next entry in the window is due (0 = now), None when empty."""
        window = self._window()
        if not window:
            return None
        now = time.monotonic()
        with self._lock:
            return max(0.0, min(self._due.get(mid, now) for mid, _ in window) - now)

    def flush_once(self) -> bool:
        """Send every due entry of the window, oldest first; False at the first one the broker
        does not acknowledge. Sent entries stay until ``ack``."""
        for mid, path in self._window():
            if self._stop.is_set() or not self.publisher.is_connected():
                return False
            with self._lock:
                if mid not in self._entries or self._due.get(mid, 0.0) > time.monotonic():
                    continue
            msg = self._read(path)
            if not msg:
                log.warning("outbox: dropping unreadable entry %s", path.name)
                with self._lock:
                    if mid in self._entries:
                        self._forget(mid).unlink(missing_ok=True)
                continue
            try:
                self.publisher.publish_acked(msg["topic"], msg["payload"].encode(),
                                             self.ack_timeout_s)
            except Exception as e:  # noqa: BLE001 - any transport failure means retry later
                log.info("outbox: %s not delivered yet (%s)", mid, e)
                return False
            with self._lock:
                if mid in self._entries:
                    tries = self._tries.get(mid, 0) + 1
                    self._tries[mid] = tries
                    self._due[mid] = time.monotonic() + resend_delay_s(
                        tries, self.resend_after_s, self.max_resend_s)
                    if tries > 1:
                        self.resent += 1
            self.sent += 1
        return True

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._wake.clear()  # before looking: a put() from now on wakes the wait below
            if not self._entries:
                self._wake.wait(1.0)
                continue
            if not self.publisher.is_connected():
                self._wake.wait(0.5)  # woken on CONNACK
                continue
            if not self.flush_once():
                delay = backoff_s(attempt, self.base_backoff_s, self.max_backoff_s)
                attempt += 1
                self._wake.wait(delay)  # stop() and resend_all() (a reconnect) cut it short
                continue
            attempt = 0
            due_in = self.next_due_in_s()
            if due_in is None or due_in > 0:
                self._wake.wait(min(due_in if due_in is not None else 1.0, 1.0))
