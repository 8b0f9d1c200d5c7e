"""The on-disk outbox: persisted before sending, in order, retried with backoff, deduplicated,
and deleted only on the server's ack (after its database commit), never on the broker's PUBACK."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from deltafleet.agent.outbox import Outbox, backoff_s, resend_delay_s


class FakePublisher:
    """The broker: PUBACKs (or not). ``server`` sees each publish and may ack it."""

    def __init__(self) -> None:
        self.connected = False
        self.fail_next = 0
        self.sent: list[tuple[str, bytes]] = []
        self.event = threading.Event()
        self.server = None

    def is_connected(self) -> bool:
        return self.connected

    def publish_acked(self, topic: str, payload: bytes, timeout_s: float) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise TimeoutError("no PUBACK")
        self.sent.append((topic, payload))
        if self.server is not None:
            self.server(topic, payload)
        self.event.set()

    def payloads(self) -> list[bytes]:
        return [p for _, p in self.sent]


def connected_box(tmp_path: Path, **kw) -> tuple[Outbox, FakePublisher]:
    pub = FakePublisher()
    pub.connected = True
    return Outbox(tmp_path, pub, **kw), pub


def wait_until(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)  # poll pacing
    return predicate()


def test_messages_wait_on_disk_while_offline_and_survive_a_restart(tmp_path: Path):
    pub = FakePublisher()
    box = Outbox(tmp_path, pub)
    box.put("e1", "t", b'{"n":1}')
    box.put("e2", "t", b'{"n":2}')
    assert not box.flush_once() and box.pending() == 2
    reopened = Outbox(tmp_path, pub)
    pub.connected = True
    assert reopened.flush_once()
    assert pub.payloads() == [b'{"n":1}', b'{"n":2}']
    assert reopened.pending_ids() == ["e1", "e2"]  # the broker took them; the server did not say


def test_an_entry_the_broker_acknowledged_stays_until_the_server_acks_it(tmp_path: Path):
    box, pub = connected_box(tmp_path)
    box.put("e1", "t", b"1")
    box.put("e2", "t", b"2")
    assert box.flush_once() and len(pub.sent) == 2
    assert box.pending() == 2
    assert box.ack(["e1"]) == 1
    assert box.pending_ids() == ["e2"] and len(list(tmp_path.glob("*.json"))) == 1
    assert Outbox(tmp_path, pub).pending_ids() == ["e2"]  # the deletion is on disk


def test_acks_for_unknown_or_already_acked_ids_change_nothing(tmp_path: Path):
    box, _ = connected_box(tmp_path)
    box.put("e1", "t", b"1")
    assert box.ack(["e1"]) == 1
    assert box.ack(["e1", "never-ours"]) == 0
    assert box.pending() == 0


def test_a_sent_entry_is_not_resent_before_its_resend_delay(tmp_path: Path):
    box, pub = connected_box(tmp_path, resend_after_s=60.0)
    box.put("e1", "t", b"1")
    assert box.flush_once() and box.flush_once()
    assert pub.payloads() == [b"1"]
    assert 25.0 <= (box.next_due_in_s() or 0) <= 60.0


def test_an_unacked_entry_is_resent_after_its_resend_delay(tmp_path: Path):
    box, pub = connected_box(tmp_path, resend_after_s=0.05)
    box.put("e1", "t", b"1")
    box.flush_once()
    assert wait_until(lambda: box.next_due_in_s() == 0.0, 5)
    box.flush_once()
    assert pub.payloads() == [b"1", b"1"] and box.resent == 1


def test_a_reconnect_makes_every_waiting_entry_due_at_once(tmp_path: Path):
    box, pub = connected_box(tmp_path, resend_after_s=60.0)
    for i in range(3):
        box.put(f"e{i}", "t", str(i).encode())
    box.flush_once()
    box.resend_all()  # e.g. the broker restarted and lost what it had PUBACKed
    box.flush_once()
    assert pub.payloads() == [b"0", b"1", b"2", b"0", b"1", b"2"]


def test_at_most_max_in_flight_unacked_entries_are_out_oldest_first(tmp_path: Path):
    box, pub = connected_box(tmp_path, max_in_flight=2, resend_after_s=60.0)
    for i in range(5):
        box.put(f"e{i}", "t", str(i).encode())
    box.flush_once()
    assert pub.payloads() == [b"0", b"1"]
    box.ack(["e0"])
    box.flush_once()
    assert pub.payloads() == [b"0", b"1", b"2"]


def test_many_pending_entries_are_acked_in_one_batch(tmp_path: Path):
    box, pub = connected_box(tmp_path, max_in_flight=500)
    ids = [f"e{i:03d}" for i in range(300)]
    for i in ids:
        box.put(i, "t", i.encode())
    box.flush_once()
    assert len(pub.sent) == 300
    assert box.ack(ids) == 300
    assert box.pending() == 0 and not list(tmp_path.glob("*.json"))


def test_the_sender_thread_drains_the_outbox_as_the_server_acks(tmp_path: Path):
    box, pub = connected_box(tmp_path, max_in_flight=4)
    pub.server = lambda topic, payload: box.ack([payload.decode()])
    for i in range(20):
        box.put(f"e{i}", "t", f"e{i}".encode())
    box.start()
    try:
        assert wait_until(lambda: box.pending() == 0)
    finally:
        box.stop()
    assert pub.payloads() == [f"e{i}".encode() for i in range(20)]  # in order, once each


def test_a_server_that_never_acks_gets_each_entry_at_a_bounded_rate(tmp_path: Path):
    """Backward compatibility: an old server never acks; the agent re-sends, with backoff."""
    box, pub = connected_box(tmp_path, resend_after_s=0.02, max_resend_s=0.16)
    box.put("e1", "t", b"1")
    box.start()
    try:
        time.sleep(1.0)  # deliberate: the interval whose re-sends are counted below
    finally:
        box.stop()
    # first send at 0, re-sends after >= 0.01, 0.02, 0.04, 0.08, then every >= 0.08 s
    assert 2 <= len(pub.sent) <= 4 + 1.0 / 0.08 + 1
    assert box.pending() == 1  # still kept: nobody said it arrived


def test_same_id_is_queued_once(tmp_path: Path):
    box = Outbox(tmp_path, FakePublisher())
    assert box.put("e1", "t", b"{}")
    assert not box.put("e1", "t", b"{}")
    assert box.pending() == 1


def test_an_entry_without_puback_is_kept_and_retried_in_order(tmp_path: Path):
    pub = FakePublisher()
    pub.connected = True
    pub.fail_next = 1
    box = Outbox(tmp_path, pub, base_backoff_s=0.01, max_backoff_s=0.02, resend_after_s=60.0)
    box.put("e1", "t", b"1")
    box.put("e2", "t", b"2")
    box.start()
    try:
        assert wait_until(lambda: len(pub.sent) >= 2)
    finally:
        box.stop()
    assert pub.payloads() == [b"1", b"2"]


def test_a_full_outbox_drops_its_oldest_entry(tmp_path: Path):
    box, _ = connected_box(tmp_path, max_messages=3)
    for i in range(4):
        box.put(f"e{i}", "t", b"x")
    assert box.pending_ids() == ["e1", "e2", "e3"]
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap():
    rng = random.Random(1)
    delays = [backoff_s(a, 0.5, 30.0, rng) for a in range(12)]
    assert all(0.05 <= d <= min(30.0, 0.5 * 2 ** a) for a, d in enumerate(delays))
    assert max(delays[8:]) > 4  # it does grow


def test_resend_delay_doubles_per_try_and_is_never_below_half_its_step():
    rng = random.Random(2)
    for tries in range(1, 15):
        step = min(300.0, 5.0 * 2 ** (tries - 1))
        assert step / 2 <= resend_delay_s(tries, 5.0, 300.0, rng) <= step
