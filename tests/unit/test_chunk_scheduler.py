"""The chunk scheduler's rules, without a broker: one publish per chunk serves every device
asking within the window, late askers and repairs are served again, the first request of an
artifact opens the long window, bandwidth caps hold chunks back, bad requests queue nothing."""

from __future__ import annotations

import pytest

from deltafleet.server.delivery.chunks import (
    CHUNK_WINDOW_S,
    FIRST_WINDOW_S,
    REPUBLISH_AFTER_S,
    STALE_S,
    ArtifactOffer,
    ChunkPublish,
    ChunkScheduler,
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
    """Devices d1 and d2 asked for every chunk of A; all went out at t=1.0."""
    s = scheduler(A=ArtifactOffer(chunks))
    s.request("d1", A, range(chunks), 0.0)
    s.request("d2", A, range(chunks), 0.2)
    assert s.due(FIRST_WINDOW_S) == pubs(A, *range(chunks))
    return s


def test_devices_asking_within_the_first_window_get_one_publish_per_chunk() -> None:
    s = scheduler(A=ArtifactOffer(4))
    assert s.request("d1", A, [2, 0, 1], 0.0).indices == (0, 1, 2)
    assert s.deadline == FIRST_WINDOW_S
    assert s.request("d2", A, [1, 2, 3], 0.5).indices == (1, 2, 3)
    assert s.deadline == FIRST_WINDOW_S  # a later request does not move the deadline
    assert s.due(FIRST_WINDOW_S - 0.01) == []
    assert s.due(FIRST_WINDOW_S) == pubs(A, 0, 1, 2, 3)
    assert s.deadline is None and s.due(5.0) == []


def test_a_slow_device_repeating_its_request_after_the_publish_gets_nothing_again() -> None:
    s = published_at_one()
    queued = s.request("d1", A, [0, 1, 2], 1.5)  # it was subscribed when they went out
    assert queued.known and queued.indices == ()
    assert s.deadline is None


def test_a_late_asker_is_served_again_but_not_within_the_republish_interval() -> None:
    s = published_at_one()
    assert s.request("d3", A, [0, 2], 1.5).indices == (0, 2)  # it started asking after 1.0
    assert s.deadline == 1.5 + CHUNK_WINDOW_S  # not the artifact's first request: short window
    assert s.due(1.5 + CHUNK_WINDOW_S) == []  # published 0.55 s ago: held back
    assert s.deduplicated == 2
    assert s.deadline == pytest.approx(1.0 + REPUBLISH_AFTER_S)  # when they may go out again
    assert s.due(1.01 + REPUBLISH_AFTER_S) == pubs(A, 0, 2)


def test_a_device_that_reconnected_counts_as_a_late_asker() -> None:
    s = published_at_one()
    s.reconnected("d1")  # its hello: its earlier subscriptions are gone
    assert s.request("d1", A, [1], 1.5).indices == (1,)


@pytest.mark.parametrize(("when", "repair", "queued"), [
    (1.5, True, (1,)),  # its copy failed its hash: sent again
    (1.5, False, ()),
    (1.0 + STALE_S + 0.5, False, (1,)),  # the publish is stale: a broker queue may have dropped it
    (1.0 + STALE_S - 0.5, False, ()),
])
def test_repairs_and_stale_publishes_are_sent_again(when: float, repair: bool,
                                                    queued: tuple[int, ...]) -> None:
    s = published_at_one()
    assert s.request("d1", A, [1], when, repair=repair).indices == queued
    assert s.due(when + REPUBLISH_AFTER_S) == pubs(A, *queued)


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
    assert s.deduplicated == 0


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
    assert s.request("d1", A, [0, 1, 2], 1.2).indices == (1, 2)
    assert s.deadline == 1.2 + CHUNK_WINDOW_S  # chunk 0 went out: no longer the first request
    assert s.due(1.2 + CHUNK_WINDOW_S) == pubs(A, 1, 2)  # their bandwidth was given back


def test_withdrawing_everything_reopens_the_first_window() -> None:
    s = scheduler(A=ArtifactOffer(2))
    s.request("d1", A, [0, 1], 0.0)
    s.withdraw(s.due(1.0))
    assert s.request("d1", A, [0, 1], 1.5).indices == (0, 1)
    assert s.deadline == 1.5 + FIRST_WINDOW_S


def test_a_republish_withdrawn_keeps_the_earlier_publish_time() -> None:
    s = published_at_one()
    s.request("d3", A, [0], 4.0)
    s.withdraw(s.due(4.0 + CHUNK_WINDOW_S))
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
