"""The chunk scheduler's rules, without a broker: one publish per chunk per round serves every
device asking within its window, a late joiner is served by the running round or waits for the
next one (never a per-device republish), rounds are bounded by time and not by the fleet,
repairs and resumes stay cheap, bandwidth caps hold chunks back, bad requests queue nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from deltafleet.server.delivery.chunks import (
    CHUNK_WINDOW_S,
    FIRST_WINDOW_S,
    LINGER_S,
    REPUBLISH_AFTER_S,
    ROUND_S,
    STALE_RETAINED_S,
    STALE_S,
    ArtifactOffer,
    ChunkClear,
    ChunkPublish,
    ChunkScheduler,
    ChunkWindows,
    DeliveryStats,
    Queued,
    TokenBucket,
)

A = "a" * 64
B = "b" * 64
CHUNK = 100


def scheduler(**offers: ArtifactOffer) -> ChunkScheduler:
    s = ChunkScheduler(CHUNK)
    s.serve({A if k == "A" else B: v for k, v in offers.items()}, now=0.0)
    return s


def pubs(sha: str, *indices: int) -> list[ChunkPublish]:
    return [ChunkPublish(sha, i) for i in indices]


def published_at_one(chunks: int = 3) -> ChunkScheduler:
    """Devices d1 and d2 asked for every chunk of A at 0.0; round 1 sent them all at 1.0."""
    s = scheduler(A=ArtifactOffer(chunks))
    s.request("d1", A, range(chunks), 0.0)
    s.request("d2", A, range(chunks), 0.0)
    assert s.due(FIRST_WINDOW_S) == pubs(A, *range(chunks))
    return s


# -- one scripted timeline per case: ("ask", t, device, indices[, repair]), ("hello", device),
#    ("due", t, [indices published]) -------------------------------------------------------

ROUND2 = 1.0 + ROUND_S  # the earliest the round after round 1 (at 1.0) may start
TIMELINES = {
    "a wave asking within the window: one round": (3, [
        ("ask", 0.0, "d1", [2, 0, 1]), ("ask", 0.3, "d2", [1, 2]),
        ("due", 1.0, []),  # d2 joined at 0.3: the gather waits FIRST_WINDOW_S after it
        ("due", 1.3, [0, 1, 2]), ("due", 9.0, []),
    ], DeliveryStats(3, 1)),
    "a slow device repeating its request after the round: nothing again": (3, [
        ("ask", 0.0, "d1", [0, 1, 2]), ("due", 1.0, [0, 1, 2]),
        ("ask", 3.0, "d1", [0, 1, 2]), ("ask", 6.0, "d1", [1]), ("due", 9.0, []),
    ], DeliveryStats(3, 1)),
    "late joiners after the round: exactly one more round covering them all": (3, [
        ("ask", 0.0, "d1", [0, 1, 2]), ("due", 1.0, [0, 1, 2]),
        ("ask", 1.2, "d3", [0, 1, 2]), ("ask", 2.5, "d4", [0, 2]), ("ask", 4.2, "d3", [0, 1, 2]),
        ("ask", 4.5, "d5", [0, 1, 2]),
        ("due", 1.25, []), ("due", 5.0, []),  # not before ROUND_S after round 1
        ("due", ROUND2, [0, 1, 2]),
        ("ask", ROUND2 + 3, "d3", [0, 1, 2]), ("ask", ROUND2 + 3, "d5", [2]),  # slow: nothing
        ("due", ROUND2 + 9, []),
    ], DeliveryStats(6, 2)),
    "a late joiner while the round is open is served by it for what it has not sent": (4, [
        ("ask", 0.0, "d1", [0, 1]), ("due", 1.0, [0, 1]),  # a resume: d1 missed only 0 and 1
        ("ask", 1.5, "d2", [0, 1, 2, 3]),  # 2, 3 join round 1; 0, 1 wait for round 2
        ("due", 1.5 + CHUNK_WINDOW_S, [2, 3]),
        ("ask", 4.6, "d2", [0, 1]),  # its retry while waiting: nothing more
        ("due", ROUND2 - 0.01, []), ("due", ROUND2, [0, 1]),
    ], DeliveryStats(6, 2)),
    "a repair goes out promptly, alone, and opens no round": (3, [
        ("ask", 0.0, "d1", [0, 1, 2]), ("due", 1.0, [0, 1, 2]),
        ("ask", 3.5, "d1", [1], True), ("due", 3.5 + CHUNK_WINDOW_S, [1]),
        ("ask", 4.0, "d2", [1], True),  # within REPUBLISH_AFTER_S of that publish: held
        ("due", 4.0 + CHUNK_WINDOW_S, []), ("due", 3.5 + CHUNK_WINDOW_S + REPUBLISH_AFTER_S, [1]),
        ("due", 20.0, []),
    ], DeliveryStats(5, 1, 2)),
    "a repair covered by the gather's round publish is dropped": (3, [
        ("ask", 0.0, "d1", [0, 1, 2]), ("ask", 0.0, "d2", [0], True), ("due", 1.0, [0, 1, 2]),
        ("due", 5.0, []),
    ], DeliveryStats(3, 1)),
    "a repair takes its chunk out of the gather: its askers were subscribed": (3, [
        ("ask", 0.0, "d1", [0, 1, 2]), ("due", 1.0, [0, 1, 2]),
        ("ask", 1.2, "d3", [0, 1, 2]), ("ask", 3.2, "d1", [2], True),
        ("due", 3.2 + CHUNK_WINDOW_S, [2]), ("due", ROUND2, [0, 1]),
    ], DeliveryStats(6, 2, 1)),
    "a reconnect resumes with the missing chunks in the next round": (4, [
        ("ask", 0.0, "d1", [0, 1, 2, 3]), ("due", 1.0, [0, 1, 2, 3]),
        ("hello", "d1"), ("ask", 2.0, "d1", [3]),  # its subscriptions were gone: 3 is lost
        ("due", 2.0 + CHUNK_WINDOW_S, []), ("due", ROUND2, [3]),
    ], DeliveryStats(5, 2)),
    "a reconnect long after the round: a small round of its own, one window later": (4, [
        ("ask", 0.0, "d1", [0, 1, 2, 3]), ("due", 1.0, [0, 1, 2, 3]),
        ("hello", "d1"), ("ask", 20.0, "d1", [2, 3]),
        ("due", 20.0 + FIRST_WINDOW_S - 0.01, []), ("due", 20.0 + FIRST_WINDOW_S, [2, 3]),
    ], DeliveryStats(6, 2)),
    "a publish older than STALE_S goes out again to whoever asks": (3, [
        ("ask", 0.0, "d1", [0, 1, 2]), ("due", 1.0, [0, 1, 2]),
        ("ask", 1.0 + STALE_S - 0.5, "d1", [1]), ("due", 1.0 + STALE_S, []),
        ("ask", 1.0 + STALE_S + 0.5, "d1", [1]), ("due", 1.0 + STALE_S + 1.5, [1]),
    ], DeliveryStats(4, 2)),
}


@pytest.mark.parametrize("case", TIMELINES)
def test_timeline(case: str) -> None:
    chunks, steps, stats = TIMELINES[case]
    s = scheduler(A=ArtifactOffer(chunks))
    for step in steps:
        if step[0] == "ask":
            _, t, device, indices, *repair = step
            assert s.request(device, A, indices, t, repair=bool(repair)).known
        elif step[0] == "hello":
            s.reconnected(step[1])
        else:
            _, t, expected = step
            assert s.due(t) == pubs(A, *expected), (case, t)
    assert s.stats(A) == stats
    assert s.deadline is None


# -- a fleet: many devices, each asking as the agent does ----------------------------------

@dataclass
class SimDevice:
    joins: float
    have: set[int] = field(default_factory=set)
    asked: bool = False
    progress: float = 0.0


def run_fleet(joins: list[float], chunks: int, *, retry_s: float = 3.0, rate: int = 0,
              until: float = 120.0, step: float = 0.05, retain: bool = False,
              broker_lost_at: float | None = None) -> tuple[ChunkScheduler, float]:
    """Devices subscribe and ask for every chunk at their join time, receive every chunk
    published after that (and, with ``retain``, every chunk retained when they subscribe), and
    ask again for what they miss after ``retry_s`` without progress (the agent's
    ``chunk_retry_s``). At ``broker_lost_at`` the broker loses its retained chunks and the
    server reconnects to it (``lost_retained``). Returns the scheduler and when the last device
    finished."""
    s = ChunkScheduler(CHUNK, retain=retain)
    s.serve({A: ArtifactOffer(chunks, rate)}, 0.0)
    fleet = {f"d{n}": SimDevice(t) for n, t in enumerate(joins)}
    retained: set[int] = set()
    t = 0.0
    while t < until:
        if broker_lost_at is not None and t >= broker_lost_at:
            retained.clear()
            s.lost_retained()
            broker_lost_at = None
        for name, d in fleet.items():
            missing = [i for i in range(chunks) if i not in d.have]
            if not missing or t < d.joins:
                continue
            if not d.asked or t - d.progress > retry_s:
                s.request(name, A, missing, t)  # as the agent: before the retained ones arrive
                if not d.asked:
                    d.have |= retained  # the broker hands a new subscriber what it retains
                d.asked, d.progress = True, t
        for p in s.due(t):
            assert p.retain == retain
            if retain:
                retained.add(p.index)
            for d in fleet.values():
                if d.asked and p.index not in d.have:
                    d.have.add(p.index)
                    d.progress = t
        if all(len(d.have) == chunks for d in fleet.values()):
            return s, t
        t = round(t + step, 6)
    raise AssertionError(f"not every device finished by {until} s")


@pytest.mark.parametrize(("devices", "spread_s", "rounds"), [
    (10, 0.0, 1),
    (2000, 0.0, 1),
    (30, 3.0, 1),  # a wave trickling in keeps the first gather open, up to ROUND_S
    (3000, 3.0, 1),
    (20, 12.0, 3),  # askers over 12 s: about one round per ROUND_S, whatever the fleet size
    (2000, 12.0, 3),
    (500, 30.0, 6),
])
def test_rounds_are_bounded_by_time_not_by_the_fleet(devices: int, spread_s: float,
                                                      rounds: int) -> None:
    chunks = 8
    joins = [round(spread_s * n / max(1, devices - 1), 2) for n in range(devices)]
    s, finished = run_fleet(joins, chunks)
    stats = s.stats(A)
    assert stats.rounds == rounds
    assert stats.published <= chunks * stats.rounds
    assert stats.rounds <= spread_s / ROUND_S + 1 + 1
    assert finished <= spread_s + ROUND_S + FIRST_WINDOW_S + 0.1  # nobody waits past a round


def test_a_late_joiner_mid_round_is_served_by_it_without_a_second_publish() -> None:
    """With the cap sending 2 chunks/s, d-late joins while the others still download round 1:
    it gets the rest of round 1, and the 3 chunks it missed come once in round 2; its retries
    while it waits publish nothing."""
    s, _ = run_fleet([0.0] * 5 + [2.0], chunks=10, rate=2 * CHUNK)
    stats = s.stats(A)
    assert (stats.rounds, stats.published) == (2, 10 + 3)


def test_repeated_requests_while_waiting_for_the_next_round_publish_nothing() -> None:
    """Askers every 0.7 s over 8 s, each retrying every second while it waits."""
    s, _ = run_fleet([0.7 * n for n in range(12)], chunks=4, retry_s=1.0)
    stats = s.stats(A)
    assert stats.published == 4 * stats.rounds
    assert stats.rounds == 2


def test_devices_asking_within_the_first_window_get_one_publish_per_chunk() -> None:
    s = scheduler(A=ArtifactOffer(4))
    assert s.request("d1", A, [2, 0, 1], 0.0).indices == (0, 1, 2)
    assert s.deadline == FIRST_WINDOW_S
    assert s.request("d2", A, [1, 2, 3], 0.5).indices == (1, 2, 3)
    assert s.deadline == 0.5 + FIRST_WINDOW_S  # a new device keeps the gather open
    assert s.request("d1", A, [3], 0.9).indices == (3,)
    assert s.deadline == 0.5 + FIRST_WINDOW_S  # ... a device already in it does not
    assert s.due(0.5 + FIRST_WINDOW_S - 0.01) == []
    assert s.due(0.5 + FIRST_WINDOW_S) == pubs(A, 0, 1, 2, 3)
    assert s.deadline is None and s.due(5.0) == []


def test_a_trickle_of_devices_holds_the_first_round_for_round_s_at_most() -> None:
    s = scheduler(A=ArtifactOffer(2))
    for n in range(20):
        s.request(f"d{n}", A, [0, 1], n * 0.5)
    assert s.deadline == ROUND_S
    assert s.due(ROUND_S) == pubs(A, 0, 1)


def test_a_slow_device_repeating_its_request_after_the_publish_gets_nothing_again() -> None:
    s = published_at_one()
    queued = s.request("d1", A, [0, 1, 2], 1.5)  # it was subscribed when they went out
    assert queued.known and queued.indices == ()
    assert s.deadline is None


def test_a_late_asker_waits_for_the_next_round() -> None:
    s = published_at_one()
    assert s.request("d3", A, [0, 2], 1.5).indices == (0, 2)  # it started asking after 1.0
    assert s.deadline == 1.0 + ROUND_S
    before = s.deduplicated
    assert s.request("d3", A, [0, 2], 4.5).indices == (0, 2)  # its retry: already gathered
    assert s.deduplicated == before + 2
    assert s.due(1.0 + ROUND_S) == pubs(A, 0, 2)


def test_a_device_that_reconnected_counts_as_a_late_asker() -> None:
    s = published_at_one()
    s.reconnected("d1")  # its hello: its earlier subscriptions are gone
    assert s.request("d1", A, [1], 1.5).indices == (1,)


@pytest.mark.parametrize(("sha", "indices", "known", "queued", "out_of_range"), [
    (B, [0], False, (), ()),  # not served
    (A, [3, 7], True, (), (3, 7)),  # past the last chunk
    (A, [-1, 2], True, (2,), (-1,)),
    (A, [], True, (), ()),
])
def test_bad_requests_queue_nothing(sha: str, indices: list[int], known: bool,
                                    queued: tuple[int, ...], out_of_range: tuple[int, ...]) -> None:
    s = scheduler(A=ArtifactOffer(3))
    result = s.request("d1", sha, indices, 0.0)
    assert (result.known, result.indices, result.out_of_range) == (known, queued, out_of_range)
    assert s.due(FIRST_WINDOW_S) == pubs(A, *queued)


def test_an_artifact_no_longer_served_is_refused_but_its_queued_chunks_still_go_out() -> None:
    s = scheduler(A=ArtifactOffer(3))
    s.request("d1", A, [0], 0.0)
    s.serve({}, 0.5)
    assert not s.request("d2", A, [1], 0.6).known
    assert s.due(FIRST_WINDOW_S) == pubs(A, 0)


def test_the_bandwidth_cap_holds_chunks_for_later_windows() -> None:
    s = scheduler(A=ArtifactOffer(5, rate_bytes_per_s=2 * CHUNK), B=ArtifactOffer(2))
    s.request("d1", A, range(5), 0.0)
    s.request("d1", B, range(2), 0.0)
    assert s.due(1.0) == pubs(A, 0, 1) + pubs(B, 0, 1)  # one second of burst; B is uncapped
    assert s.deadline == 1.0 + CHUNK_WINDOW_S
    assert s.due(1.0 + CHUNK_WINDOW_S) == []  # a tenth of a chunk's tokens since
    assert s.deadline == pytest.approx(1.0 + 2 * CHUNK_WINDOW_S)
    assert s.due(1.6) == pubs(A, 2)
    assert s.due(3.0) == pubs(A, 3, 4)
    assert s.deadline is None
    assert (s.stats(A), s.stats(B)) == (DeliveryStats(5, 1), DeliveryStats(2, 1))


def test_a_capped_round_outlasting_round_s_delays_the_next_one() -> None:
    s = scheduler(A=ArtifactOffer(8, rate_bytes_per_s=CHUNK))
    s.request("d1", A, range(8), 0.0)
    assert s.due(1.0) == pubs(A, 0)
    s.request("d2", A, range(8), 1.5)  # 1..7 join round 1; 0 waits for round 2
    sent = [p.index for t in range(2, 9) for p in s.due(float(t))]
    assert sent == [1, 2, 3, 4, 5, 6, 7]  # round 1 ends at 8.0, past 1.0 + ROUND_S
    assert s.due(8.0 + CHUNK_WINDOW_S) == []
    assert s.due(9.0) == pubs(A, 0)
    assert s.stats(A) == DeliveryStats(9, 2)


def test_lifting_the_cap_releases_what_it_held() -> None:
    s = scheduler(A=ArtifactOffer(4, rate_bytes_per_s=CHUNK))
    s.request("d1", A, range(4), 0.0)
    assert s.due(1.0) == pubs(A, 0)
    s.serve({A: ArtifactOffer(4)}, 1.01)
    assert s.due(1.0 + CHUNK_WINDOW_S) == pubs(A, 1, 2, 3)


def test_a_changed_cap_starts_a_full_bucket() -> None:
    s = scheduler(A=ArtifactOffer(6, rate_bytes_per_s=CHUNK))
    s.request("d1", A, range(6), 0.0)
    assert s.due(1.0) == pubs(A, 0)
    s.serve({A: ArtifactOffer(6, rate_bytes_per_s=3 * CHUNK)}, 1.02)
    assert s.due(1.0 + CHUNK_WINDOW_S) == pubs(A, 1, 2, 3)


def test_withdrawn_chunks_count_as_never_published() -> None:
    s = scheduler(A=ArtifactOffer(3, rate_bytes_per_s=3 * CHUNK))
    s.request("d1", A, range(3), 0.0)
    due = s.due(1.0)
    assert due == pubs(A, 0, 1, 2)
    s.withdraw(due[1:])  # the blob failed its check at chunk 1: 1 and 2 never went out
    assert s.stats(A) == DeliveryStats(1, 1)
    assert s.request("d1", A, [0, 1, 2], 1.2).indices == (1, 2)
    assert s.deadline == 1.2 + CHUNK_WINDOW_S  # round 1 never sent them: they join it
    assert s.due(1.2 + CHUNK_WINDOW_S) == pubs(A, 1, 2)  # their bandwidth was given back


def test_withdrawing_everything_reopens_the_first_window() -> None:
    s = scheduler(A=ArtifactOffer(2))
    s.request("d1", A, [0, 1], 0.0)
    s.withdraw(s.due(1.0))
    assert s.stats(A) == DeliveryStats(0, 0)  # the round never happened
    assert s.request("d1", A, [0, 1], 1.5).indices == (0, 1)
    assert s.deadline == 1.5 + FIRST_WINDOW_S


def test_a_repair_withdrawn_keeps_the_earlier_publish_time() -> None:
    s = published_at_one()
    s.request("d3", A, [0], 4.0, repair=True)
    s.withdraw(s.due(4.0 + CHUNK_WINDOW_S))
    assert s.stats(A) == DeliveryStats(3, 1)
    assert s.request("d1", A, [0], 4.5).indices == ()  # d1 was there for the publish at 1.0
    assert s.request("d1", A, [0], 1.0 + STALE_S + 1).indices == (0,)


@pytest.mark.parametrize(("steps", "granted"), [
    ([(0.0, 100), (0.0, 100)], [True, False]),
    ([(0.0, 60), (0.0, 60), (0.5, 60)], [True, False, True]),
    ([(5.0, 100), (5.0, 100)], [True, False]),  # bursts of one second only
    ([(0.0, 101)], [False]),
])
def test_token_bucket(steps: list[tuple[float, int]], granted: list[bool]) -> None:
    bucket = TokenBucket(100, now=0.0)
    assert [bucket.take(n, now) for now, n in steps] == granted


def test_a_cap_below_one_chunk_a_second_still_sends_one_chunk_per_chunk_over_rate() -> None:
    bucket = TokenBucket(64_000, now=0.0, unit=65_536)  # 64 kB/s, 64 KiB chunks
    assert bucket.take(65_536, 0.0)
    assert not bucket.take(65_536, 1.0)  # 64,000 B back: not yet a chunk
    assert bucket.take(65_536, 1.03)  # 65,920 B back
    assert bucket.take(65_536, 5.0)  # refilled, but bursts stop at one chunk:
    assert not bucket.take(65_536, 5.0)


def test_a_scheduler_capped_below_one_chunk_a_second_publishes_every_chunk() -> None:
    s = ChunkScheduler(CHUNK, ChunkWindows())
    rate = CHUNK // 2  # half a chunk per second
    s.serve({A: ArtifactOffer(3, rate)}, now=0.0)
    s.request("d1", A, range(3), 0.0)
    sent: list[int] = []
    now = 0.0
    while now < 30.0 and len(sent) < 3:
        now += 0.5
        sent += [p.index for p in s.due(now) if p.artifact_sha == A]
    assert sorted(sent) == [0, 1, 2]
    assert now >= 4.0  # two chunks over the cap took about 2 s each


# -- retained mode: each chunk once per rollout, however late devices ask ------------------

def retained_scheduler(chunks: int = 3, **windows: float) -> ChunkScheduler:
    s = ChunkScheduler(CHUNK, ChunkWindows(**windows), retain=True)
    s.serve({A: ArtifactOffer(chunks)}, now=0.0)
    return s


def retained_published_at_one(chunks: int = 3, **windows: float) -> ChunkScheduler:
    s = retained_scheduler(chunks, **windows)
    s.request("d1", A, range(chunks), 0.0)
    assert s.due(FIRST_WINDOW_S) == [ChunkPublish(A, i, retain=True) for i in range(chunks)]
    return s


@pytest.mark.parametrize("late_s", [1.2, ROUND_S + 1, STALE_S + 5, 3 * 3600.0])
def test_retained_a_late_asker_gets_nothing_published(late_s: float) -> None:
    """It subscribed before asking: the broker handed it every retained chunk."""
    s = retained_published_at_one()
    s.reconnected("d1")
    for device in ("d1", "d2", "d3"):
        s.request(device, A, [0, 1, 2], late_s)
    assert s.due(late_s + ROUND_S + FIRST_WINDOW_S) == []
    assert s.stats(A) == DeliveryStats(3, 1, 0)
    assert s.retained == {A: 3}


def test_retained_a_repair_is_one_retained_publish() -> None:
    s = retained_published_at_one()
    s.request("d2", A, [1], 40.0, repair=True)
    s.request("d3", A, [1], 40.01, repair=True)
    assert s.due(40.0 + CHUNK_WINDOW_S) == [ChunkPublish(A, 1, retain=True)]
    assert s.due(60.0) == []
    assert s.stats(A) == DeliveryStats(4, 1, 1)


def test_retained_a_slow_fanout_costs_no_second_publish() -> None:
    """5,000 devices on one broker: some wait STALE_S and more for chunks still queued for them.
    They re-subscribe (the broker re-sends its retained copy); the server publishes nothing."""
    s = retained_published_at_one()
    for t in (2.0, 10.0, STALE_S + 2, 2 * STALE_S + 2):
        s.request("slow", A, [0, 1, 2], t)
    assert s.due(2 * STALE_S + 2 + ROUND_S + FIRST_WINDOW_S) == []
    assert s.stats(A).published == 3 and s.stale_requeued == 0


def test_retained_a_device_stalled_for_stale_retained_s_gets_its_chunks_again_once() -> None:
    """Its broker queue overflowed and re-subscribing did not help: it keeps asking; after
    STALE_RETAINED_S the chunks go out again (retained), once for every staller of that window."""
    s = retained_published_at_one()
    for t in (10.0, 13.0, 16.0, 10.0 + STALE_RETAINED_S - 0.5):
        s.request("d2", A, [0, 2], t)
    assert s.due(10.0 + STALE_RETAINED_S) == []
    s.request("d2", A, [0, 2], 10.0 + STALE_RETAINED_S + 1)
    s.request("d3", A, [2], 10.0 + STALE_RETAINED_S + 1.1)  # just subscribed: not a staller
    assert s.due(10.0 + STALE_RETAINED_S + 2.2) == [ChunkPublish(A, 0, True),
                                                     ChunkPublish(A, 2, True)]
    assert s.stale_requeued == 2
    s.request("d2", A, [0, 2], 10.0 + STALE_RETAINED_S + 4)  # published 2 s ago: nothing
    assert s.due(10.0 + STALE_RETAINED_S + 20) == []
    assert s.stats(A).published == 5


def test_retained_chunks_the_broker_may_have_lost_go_out_once_more() -> None:
    s = retained_published_at_one()
    s.lost_retained()
    s.request("d2", A, [0, 1, 2], 20.0)
    s.request("d3", A, [1, 2], 20.5)
    assert s.due(21.5) == [ChunkPublish(A, i, True) for i in range(3)]
    s.request("d4", A, [0, 1, 2], 30.0)
    assert s.due(40.0) == []
    assert s.stats(A) == DeliveryStats(6, 2, 0)


def test_retained_a_withdrawn_re_retain_stays_lost() -> None:
    s = retained_published_at_one()
    s.lost_retained()
    s.request("d2", A, [0], 20.0)
    assert s.due(21.0) == [ChunkPublish(A, 0, True)]
    s.withdraw([ChunkPublish(A, 0, True)])
    s.request("d3", A, [0], 30.0)
    assert s.due(31.0) == [ChunkPublish(A, 0, True)]


def test_retained_chunks_are_cleared_linger_s_after_the_artifact_left() -> None:
    s = retained_published_at_one(linger_s=60.0)
    s.request("d2", A, [0], 9.0, repair=True)  # queued, then the artifact leaves: dropped
    s.serve({}, 10.0)
    assert s.due(10.0 + CHUNK_WINDOW_S) == []
    assert s.clears(69.9) == []
    assert s.clears(70.0) == [ChunkClear(A, 3)]
    assert s.clears(200.0) == []
    assert s.retained == {}
    s.serve({A: ArtifactOffer(3)}, 300.0)  # served again: from nothing retained
    s.request("d5", A, [0, 1, 2], 300.0)
    assert s.due(301.0) == [ChunkPublish(A, i, True) for i in range(3)]


def test_retained_an_artifact_back_within_linger_s_keeps_its_chunks() -> None:
    """Between two waves of a rollout no device of it is in flight for a while."""
    s = retained_published_at_one()
    s.serve({}, 10.0)
    s.serve({A: ArtifactOffer(3)}, 10.0 + LINGER_S - 1)
    assert s.clears(10.0 + 2 * LINGER_S) == []
    s.request("d2", A, [0, 1, 2], 10.0 + LINGER_S)
    assert s.due(20.0 + LINGER_S) == []
    assert s.retained == {A: 3}


def test_retained_list_survives_a_restart_and_is_cleared_if_no_longer_served() -> None:
    s = ChunkScheduler(CHUNK, ChunkWindows(linger_s=5.0), retain=True)
    s.restore({A: 3, B: 7}, 0.0)
    assert s.retained == {A: 3, B: 7}
    s.serve({B: ArtifactOffer(7)}, 1.0)
    assert s.clears(4.9) == []
    assert s.clears(5.0) == [ChunkClear(A, 3)]
    assert s.retained == {B: 7}
    s.request("d1", B, [0], 6.0)  # not known published since the restart: published once
    assert s.due(7.0) == [ChunkPublish(B, 0, True)]


def test_without_retain_nothing_is_retained_or_cleared() -> None:
    s = published_at_one()
    assert all(not p.retain for p in s.due(100.0))
    s.serve({}, 1.0)
    assert s.retained == {}
    assert s.clears(1.0 + LINGER_S) == []


@pytest.mark.parametrize(("devices", "spread_s"), [
    (30, 0.0), (30, 12.0), (2000, 12.0), (500, 30.0), (200, 4 * 3600.0),
])
def test_retained_one_publish_per_chunk_whenever_devices_ask(devices: int,
                                                             spread_s: float) -> None:
    chunks = 8
    joins = [round(spread_s * n / max(1, devices - 1), 2) for n in range(devices)]
    step = 0.05 if spread_s < 100 else 60.0
    s, finished = run_fleet(joins, chunks, retain=True, until=spread_s + 60, step=step)
    assert s.stats(A) == DeliveryStats(chunks, 1, 0)
    assert finished <= spread_s + FIRST_WINDOW_S + step + 0.1


def test_retained_a_broker_that_lost_its_store_costs_one_more_publish_per_chunk() -> None:
    chunks = 8
    joins = [0.0] * 5 + [10.0 + n for n in range(10)]
    s, _ = run_fleet(joins, chunks, retain=True, broker_lost_at=12.5)
    assert s.stats(A).published == 2 * chunks


def test_a_zero_length_clear_fails_the_device_chunk_check(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A device still subscribed when the server clears an artifact receives empty payloads:
    they fail the chunk hash and nothing is stored (its repair request is then refused as for
    an artifact no longer served)."""
    from deltafleet.agent.update import ChunkSet
    from deltafleet.shared import ArtifactRef, Manifest, sha256_bytes

    data = b"x" * CHUNK
    art = ArtifactRef("full", "identity", sha256_bytes(data), CHUNK, CHUNK,
                      (sha256_bytes(data),))
    m = Manifest("m", "dev-1", 1, 1, 2, None, "det", "v1", "default", "onnx", art.sha256,
                 CHUNK, None, art)
    cs = ChunkSet(m, tmp_path / "dl")
    assert cs.accept(0, b"") is False
    assert cs.have == set() and cs.missing() == [0] and not any((tmp_path / "dl").iterdir())
    assert cs.accept(0, data) is True
    assert cs.accept(0, b"") is False and cs.have == {0}
    s = retained_published_at_one()
    s.serve({}, 5.0)
    assert s.request("dev-1", A, [0], 6.0, repair=True) == Queued(A, known=False)
