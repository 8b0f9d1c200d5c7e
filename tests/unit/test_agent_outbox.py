"""The on-disk outbox: persisted before sending, in order, retried with backoff, deduplicated."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from deltafleet.agent.outbox import Outbox, backoff_s


class FakePublisher:
    def __init__(self) -> None:
        self.connected = False
        self.fail_next = 0
        self.sent: list[tuple[str, bytes]] = []
        self.event = threading.Event()

    def is_connected(self) -> bool:
        return self.connected

    def publish_acked(self, topic: str, payload: bytes, timeout_s: float) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise TimeoutError("no PUBACK")
        self.sent.append((topic, payload))
        self.event.set()


def test_messages_wait_on_disk_while_offline_and_survive_a_restart(tmp_path: Path):
    pub = FakePublisher()
    box = Outbox(tmp_path, pub)
    box.put("e1", "t", b'{"n":1}')
    box.put("e2", "t", b'{"n":2}')
    assert not box.flush_once() and box.pending() == 2
    reopened = Outbox(tmp_path, pub)
    pub.connected = True
    assert reopened.flush_once()
    assert [p for _, p in pub.sent] == [b'{"n":1}', b'{"n":2}']
    assert reopened.pending() == 0


def test_same_id_is_queued_once(tmp_path: Path):
    box = Outbox(tmp_path, FakePublisher())
    assert box.put("e1", "t", b"{}")
    assert not box.put("e1", "t", b"{}")
    assert box.pending() == 1


def test_unacked_message_is_kept_and_retried_in_order(tmp_path: Path):
    pub = FakePublisher()
    pub.connected = True
    pub.fail_next = 1
    box = Outbox(tmp_path, pub, base_backoff_s=0.01, max_backoff_s=0.02)
    box.put("e1", "t", b"1")
    box.put("e2", "t", b"2")
    box.start()
    try:
        for _ in range(200):
            if len(pub.sent) == 2:
                break
            pub.event.wait(0.05)
            pub.event.clear()
    finally:
        box.stop()
    assert [p for _, p in pub.sent] == [b"1", b"2"]


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap():
    rng = random.Random(1)
    delays = [backoff_s(a, 0.5, 30.0, rng) for a in range(12)]
    assert all(0.05 <= d <= min(30.0, 0.5 * 2 ** a) for a, d in enumerate(delays))
    assert max(delays[8:]) > 4  # it does grow
