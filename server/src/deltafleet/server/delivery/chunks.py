"""Chunk scheduling: which artifact chunks to publish, and when. Pure: no MQTT, no files, no
clock of its own (every ``now`` is a monotonic time in seconds given by the caller).

Devices ask for the chunk indices they miss; each chunk goes out on one content-addressed
topic, and every device subscribed to it then receives it (QoS 1). So one publish per chunk
serves every device asking within a window, and a device that was already asking when a chunk
went out is not sent it again merely because it is slow.

Rules, per chunk ``(artifact, index)``:

- ``request(device, artifact, indices, now, repair=...)`` queues chunk ``i`` when the artifact
  is served (``serve``), ``0 <= i < chunks`` (anything else is ignored), and one of: it was
  never published; this device started asking for the artifact (its first request since its
  last ``reconnected``) after the last publish; ``repair`` (its copy failed its hash on the
  device); the last publish is older than ``stale_s`` (a broker queue may have overflowed).
- Windows: when something is queued and no flush is due yet, the flush is due ``first_s``
  later if no chunk of the artifact was ever published (the burst of requests from a whole
  wave is then answered by one publish per chunk), else ``repair_s`` later.
- ``due(now)``, once ``now`` reaches the deadline, takes every queued chunk, per artifact in
  index order: one published less than ``republish_after_s`` ago stays queued (counted in
  ``deduplicated``; the flush is due again when it may be republished); one over the artifact's
  bandwidth cap (a token bucket of ``rate_bytes_per_s``, one second of burst, ``chunk_size``
  bytes per chunk) stays queued for the next window; every other one is published now. While
  anything stays queued the next flush is due within ``republish_after_s``.
- ``withdraw(publishes)``: chunks ``due`` returned that could not be sent (their blob failed its
  check) count as never published and cost no bandwidth; they are not queued again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "CHUNK_WINDOW_S",
    "FIRST_WINDOW_S",
    "REPUBLISH_AFTER_S",
    "STALE_S",
    "ArtifactOffer",
    "ChunkPublish",
    "ChunkScheduler",
    "ChunkWindows",
    "Queued",
    "TokenBucket",
]

CHUNK_WINDOW_S = 0.05  # gather repair requests this long before answering
FIRST_WINDOW_S = 1.0  # ... and this long for the first request of an artifact
REPUBLISH_AFTER_S = 2.0  # never publish the same chunk twice within this interval
STALE_S = 30.0  # a chunk published longer ago than this is sent again to whoever asks


@dataclass(frozen=True, slots=True)
class ChunkWindows:
    """The scheduler's timing, in seconds (see the module docstring)."""

    repair_s: float = CHUNK_WINDOW_S
    first_s: float = FIRST_WINDOW_S
    republish_after_s: float = REPUBLISH_AFTER_S
    stale_s: float = STALE_S


@dataclass(frozen=True, slots=True)
class ArtifactOffer:
    """An artifact being served: its number of chunks and its bandwidth cap (0 = none)."""

    chunks: int
    rate_bytes_per_s: int = 0


@dataclass(frozen=True, slots=True)
class ChunkPublish:
    """Publish chunk ``index`` of ``artifact_sha`` (on its content-addressed topic)."""

    artifact_sha: str
    index: int


@dataclass(frozen=True, slots=True)
class Queued:
    """What one request did: ``indices`` are queued for the next flush (sorted, maybe none);
    ``known`` is False for an artifact not being served (nothing queued)."""

    artifact_sha: str
    known: bool
    indices: tuple[int, ...] = ()
    out_of_range: tuple[int, ...] = ()


class TokenBucket:
    """Bandwidth cap for one artifact: ``rate`` bytes/s, bursts of one second."""

    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate_bytes_per_s: int, now: float) -> None:
        self.rate = rate_bytes_per_s
        self.tokens = float(rate_bytes_per_s)
        self.stamp = now

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    def give(self, n: int) -> None:
        self.tokens = min(float(self.rate), self.tokens + n)


class ChunkScheduler:
    """One replica's chunk delivery state; see the module docstring for the rules."""

    def __init__(self, chunk_size_bytes: int, windows: ChunkWindows | None = None) -> None:
        self.chunk_size_bytes = chunk_size_bytes
        self.windows = windows or ChunkWindows()
        self.deduplicated = 0  # queued chunks held back because they had just been published
        self._offers: dict[str, ArtifactOffer] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._pending: dict[str, set[int]] = {}
        self._deadline: float | None = None
        self._published_at: dict[str, dict[int, float]] = {}
        # device -> artifact -> when it first asked (this connection; reset by reconnected)
        self._first_request: dict[str, dict[str, float]] = {}
        self._undo: dict[tuple[str, int], float | None] = {}  # stamps before the last due()

    @property
    def deadline(self) -> float | None:
        """When ``due`` next has something to decide (None: nothing queued)."""
        return self._deadline

    def serve(self, offers: Mapping[str, ArtifactOffer], now: float) -> None:
        """The artifacts devices may fetch now (all others are refused). A changed cap
        starts a full bucket; chunks already queued still go out."""
        self._offers = dict(offers)
        for sha, offer in offers.items():
            rate = offer.rate_bytes_per_s
            bucket = self._buckets.get(sha)
            if rate and (bucket is None or bucket.rate != rate):
                self._buckets[sha] = TokenBucket(rate, now)
            elif not rate:
                self._buckets.pop(sha, None)

    def reconnected(self, device_id: str) -> None:
        """The device (re)connected: its earlier subscriptions are gone."""
        self._first_request.pop(device_id, None)

    def request(self, device_id: str, artifact_sha: str, indices: Iterable[int], now: float,
                *, repair: bool = False) -> Queued:
        offer = self._offers.get(artifact_sha)
        if offer is None:
            return Queued(artifact_sha, known=False)
        first = self._first_request.setdefault(device_id, {}).setdefault(artifact_sha, now)
        published = self._published_at.get(artifact_sha, {})
        queued: set[int] = set()
        out_of_range: set[int] = set()
        for i in indices:
            if not 0 <= i < offer.chunks:
                out_of_range.add(i)
                continue
            last = published.get(i)
            if last is None or first > last or repair or now - last > self.windows.stale_s:
                queued.add(i)
        if queued:
            self._pending.setdefault(artifact_sha, set()).update(queued)
        if self._pending.get(artifact_sha) and self._deadline is None:
            fresh = not published
            self._deadline = now + (self.windows.first_s if fresh else self.windows.repair_s)
        return Queued(artifact_sha, True, tuple(sorted(queued)), tuple(sorted(out_of_range)))

    def due(self, now: float) -> list[ChunkPublish]:
        """The chunks to publish now (recorded as published at ``now``); [] before the
        deadline."""
        if self._deadline is None or now < self._deadline:
            return []
        w = self.windows
        pending, self._pending = self._pending, {}
        self._deadline = None
        self._undo = {}
        wake = now + w.repair_s
        out: list[ChunkPublish] = []
        for sha, indices in pending.items():
            bucket = self._buckets.get(sha)
            stamps = self._published_at.setdefault(sha, {})
            for i in sorted(indices):
                last = stamps.get(i)
                since = now - (last if last is not None else -1e9)
                if since < w.republish_after_s:
                    self.deduplicated += 1
                    self._pending.setdefault(sha, set()).add(i)
                    wake = max(wake, now + w.republish_after_s - since)
                    continue
                if bucket is not None and not bucket.take(self.chunk_size_bytes, now):
                    self._pending.setdefault(sha, set()).add(i)  # over the cap: next window
                    continue
                self._undo[(sha, i)] = last
                stamps[i] = now
                out.append(ChunkPublish(sha, i))
            if not stamps:
                del self._published_at[sha]
        if self._pending:
            self._deadline = min(wake, now + w.republish_after_s)
        return out

    def withdraw(self, publishes: Iterable[ChunkPublish]) -> None:
        """These chunks from the last ``due`` were not sent: forget they were published and
        give their bandwidth back."""
        for p in publishes:
            key = (p.artifact_sha, p.index)
            if key not in self._undo:
                continue
            before = self._undo.pop(key)
            stamps = self._published_at.get(p.artifact_sha, {})
            if before is None:
                stamps.pop(p.index, None)
            else:
                stamps[p.index] = before
            if not stamps:
                self._published_at.pop(p.artifact_sha, None)
            bucket = self._buckets.get(p.artifact_sha)
            if bucket is not None:
                bucket.give(self.chunk_size_bytes)
