"""Store-and-forward outbox: every report is on disk before anyone tries to send it.

Layout: ``outbox/<seq:012d>.json`` = ``{"id", "topic", "payload" (utf-8 text), "created_at"}``,
written with the durable helper (temp + fsync + rename + fsync dir). A sender thread publishes
the oldest message at QoS 1 while the broker is connected, deletes it after the PUBACK, and
otherwise retries with exponential backoff and full jitter. Delivery is at-least-once with the
message's stable id (the event's ``event_id``): the server applies each id once.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
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


class Outbox:
    def __init__(self, directory: Path, publisher: Publisher, *, base_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, max_messages: int = 10_000,
                 ack_timeout_s: float = 10.0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        self.publisher = publisher
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_messages = max_messages
        self.ack_timeout_s = ack_timeout_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        existing = self._files()
        self._seq = int(existing[-1].stem) if existing else 0
        self._ids = {self._read(f).get("id") for f in existing}
        self.sent = 0

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
            if message_id in self._ids:
                return False
            files = self._files()
            if len(files) >= self.max_messages:
                log.warning("outbox full (%d): dropping the oldest message", len(files))
                files[0].unlink(missing_ok=True)
            self._seq += 1
            atomic_write_json(self.dir / f"{self._seq:012d}.json", {
                "id": message_id, "topic": topic, "payload": payload.decode(),
                "created_at": time.time()})
            self._ids.add(message_id)
        self._wake.set()
        return True

    def pending(self) -> int:
        return len(self._files())

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

    def flush_once(self) -> bool:
        """Send every pending message in order; False at the first one that is not acked."""
        for path in self._files():
            if self._stop.is_set() or not self.publisher.is_connected():
                return False
            msg = self._read(path)
            if not msg:
                path.unlink(missing_ok=True)
                continue
            try:
                self.publisher.publish_acked(msg["topic"], msg["payload"].encode(),
                                             self.ack_timeout_s)
            except Exception as e:  # noqa: BLE001 - any transport failure means retry later
                log.info("outbox: %s not delivered yet (%s)", msg["id"], e)
                return False
            with self._lock:
                path.unlink(missing_ok=True)
                self._ids.discard(msg["id"])
            self.sent += 1
        return True

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if not self._files():
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            if not self.publisher.is_connected():
                self._wake.wait(0.5)  # woken on CONNACK
                self._wake.clear()
                continue
            if self.flush_once():
                attempt = 0
                continue
            delay = backoff_s(attempt, self.base_backoff_s, self.max_backoff_s)
            attempt += 1
            self._stop.wait(delay)
