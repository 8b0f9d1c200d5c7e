"""Chunk scheduling: which artifact chunks to publish, and when. Pure: no MQTT, no files, no
clock of its own (every ``now`` is a monotonic time in seconds given by the caller).

Devices subscribe to an artifact's chunk topics, then ask for the chunk indices they miss; each
chunk goes out on one content-addressed topic, and every device subscribed to it then receives
it (QoS 1). So a publish of chunk ``i`` at time ``t`` serves every device that asked for ``i``
before ``t``, and the server's egress is bounded by publishing each chunk once per ROUND: a
round gathers every request of a window, however many devices made them, and rounds of an
artifact start at most every ``round_s``, so their number grows with the rollout's duration,
never with the fleet.

A device *needs* chunk ``i`` (of a served artifact, ``0 <= i < chunks``; anything else is
ignored) when it was never published, when the device started asking for the artifact (its
first request since its last ``reconnected``) after the last publish, when that publish is
older than ``stale_s`` (a broker queue may have overflowed), or on ``repair`` (its copy failed
its hash on the device). A request for a chunk the device does not need publishes nothing: it
was subscribed when the chunk went out and is merely slow.

Per artifact, a needed chunk goes, in this order of rules:

- to nothing new if the running round will still publish it (counted in ``deduplicated``);
- on ``repair``, to the repairs: published ``repair_s`` later, alone (no round is opened), but
  never within ``republish_after_s`` of its last publish (held until then); a repair the round
  covers first is dropped;
- into the running round while the round is OPEN (less than ``round_s`` since it started, or
  chunks still held by the bandwidth cap) and has not published this chunk yet: a device that
  joins while the round is still sending is served by it, ``repair_s`` later at most;
- otherwise into the GATHER for the next round (a chunk the open round already published, or no
  round open).

A gather becomes a round when no round is open, once ``first_s`` passed without a new device
joining it (a wave of requests keeps it gathering, for ``round_s`` at most after it opened):
due at ``max(min(last_join + first_s, opened + round_s), last_round_start + round_s)``. The
round publishes what it holds, in index order, as the artifact's bandwidth cap allows (a token
bucket of ``rate_bytes_per_s``, one second (at least one chunk) of burst, ``chunk_size``
bytes per chunk; chunks
over it stay in the round for ``repair_s`` later). Any publish of chunk ``i`` takes ``i`` out of
the gather and the repairs: every device waiting for it was subscribed. So each chunk goes out
at most once per round, plus repairs (each at most once per ``republish_after_s``).

``withdraw(publishes)``: chunks ``due`` returned that could not be sent (their blob failed its
check) count as never published and cost no bandwidth; they are not queued again. A round all
of whose publishes were withdrawn never happened.

RETAINED mode (``retain=True``): every publish is retained on the chunk's topic, so a device
subscribing later receives from the broker every chunk published so far, and a published chunk
stays published: a device needs chunk ``i`` only when it was never published, on ``repair``,
when the broker may have lost it (``lost_retained``: the server reconnected to a broker that
kept no session, e.g. one restarted without persistence; each such chunk goes out once more,
to the first asker) or when the device has been asking since ``stale_retained_s`` ago and the
chunk's last publish is older than that too (its queue on the broker overflowed). That wait is
long on purpose: a device that gets no chunk for a while subscribes to the chunk topics again
(``MachineConfig.resubscribe_after_s``) and the broker re-sends what it retains, so a slow broker
fan-out (5,000 devices taking 15 chunks each) costs the server no second publish. Asking late costs
nothing, so each chunk goes out once per rollout plus repairs. The artifacts with retained
chunks are in ``retained`` (artifact -> number of chunks; ``restore`` reloads it after a
restart); an artifact that left ``serve`` has its queued chunks dropped at once and, once it
has stayed out ``linger_s`` (a later wave of its rollout reuses its chunks), is returned once
by ``clears`` (publish an empty retained message on each of its chunk topics) and forgotten:
served again, it starts from nothing published. Retaining a chunk twice (another replica, a
restart) is harmless: the broker keeps one message per topic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "CHUNK_WINDOW_S",
    "FIRST_WINDOW_S",
    "REPUBLISH_AFTER_S",
    "ROUND_S",
    "STALE_RETAINED_S",
    "STALE_S",
    "ArtifactOffer",
    "LINGER_S",
    "ChunkClear",
    "ChunkPublish",
    "ChunkScheduler",
    "ChunkWindows",
    "DeliveryStats",
    "Queued",
    "TokenBucket",
]

CHUNK_WINDOW_S = 0.05  # gather repairs (and joiners of a running round) this long
FIRST_WINDOW_S = 1.0  # a gather becomes a round after this long without a new device
ROUND_S = 5.0  # rounds of one artifact start at least this far apart
REPUBLISH_AFTER_S = 2.0  # a repair never republishes a chunk within this interval
STALE_S = 30.0  # a chunk published longer ago than this is sent again to whoever asks
STALE_RETAINED_S = 180.0  # the same in retained mode, where the broker re-sends on re-subscribe
LINGER_S = 900.0  # retained chunks of an artifact no longer served are cleared this much later


@dataclass(frozen=True, slots=True)
class ChunkWindows:
    """The scheduler's timing, in seconds (see the module docstring)."""

    repair_s: float = CHUNK_WINDOW_S
    first_s: float = FIRST_WINDOW_S
    republish_after_s: float = REPUBLISH_AFTER_S
    stale_s: float = STALE_S
    stale_retained_s: float = STALE_RETAINED_S
    round_s: float = ROUND_S
    linger_s: float = LINGER_S


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
    retain: bool = False
    # published for a repair request (metrics: bytes by kind); not part of what is published
    repair: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class ChunkClear:
    """Clear the retained chunks ``0 .. chunks-1`` of ``artifact_sha`` (empty retained
    publishes)."""

    artifact_sha: str
    chunks: int


@dataclass(frozen=True, slots=True)
class Queued:
    """What one request did: ``indices`` are the needed chunks now queued -- in the running
    round, the gather or the repairs -- (sorted, maybe none); ``known`` is False for an artifact
    not being served (nothing queued)."""

    artifact_sha: str
    known: bool
    indices: tuple[int, ...] = ()
    out_of_range: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    """One artifact's delivery so far: chunk publishes (withdrawn ones not counted), rounds
    started, and of the publishes those made for repairs."""

    published: int = 0
    rounds: int = 0
    repairs: int = 0


class TokenBucket:
    """Bandwidth cap for one artifact: ``rate`` bytes/s, bursts of one second or of one
    ``unit`` (a chunk), whichever is larger: a cap below one chunk per second still sends, one
    chunk every ``unit / rate`` seconds, instead of never."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate_bytes_per_s: int, now: float, unit: int = 0) -> None:
        self.rate = rate_bytes_per_s
        self.capacity = float(max(rate_bytes_per_s, unit))
        self.tokens = self.capacity
        self.stamp = now

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    def give(self, n: int) -> None:
        self.tokens = min(self.capacity, self.tokens + n)


class _Delivery:
    """One artifact's rounds, gather and repairs (the scheduler's internal state)."""

    __slots__ = ("gather", "gather_devices", "joined", "last", "lost", "opened", "published",
                 "repair_due", "repairs", "round_repairs", "round_started", "rounds", "running",
                 "running_wake", "sent_in_round")

    def __init__(self) -> None:
        self.last: dict[int, float] = {}  # chunk -> its last publish
        self.lost: set[int] = set()  # published chunks the broker may have lost (retained mode)
        self.round_started: float | None = None
        self.rounds = 0
        self.running: set[int] = set()  # the running round's chunks not published yet
        self.running_wake: float | None = None
        self.sent_in_round: set[int] = set()
        self.gather: set[int] = set()
        self.gather_devices: set[str] = set()
        self.opened = 0.0
        self.joined = 0.0
        self.repairs: set[int] = set()
        self.repair_due: float | None = None
        self.published = 0
        self.round_repairs = 0

    def is_open(self, now: float, w: ChunkWindows) -> bool:
        return bool(self.running) or (self.round_started is not None
                                      and now < self.round_started + w.round_s)

    def gather_due(self, w: ChunkWindows) -> float | None:
        if not self.gather:
            return None
        due = min(self.joined + w.first_s, self.opened + w.round_s)
        if self.round_started is not None:
            due = max(due, self.round_started + w.round_s)
        return due

    def deadline(self, w: ChunkWindows) -> float | None:
        times = [t for t in (self.running_wake if self.running else None,
                             self.repair_due if self.repairs else None,
                             None if self.running else self.gather_due(w)) if t is not None]
        return min(times) if times else None

    def sent(self, i: int, now: float) -> None:
        self.last[i] = now
        self.lost.discard(i)
        self.published += 1
        self.gather.discard(i)
        self.repairs.discard(i)
        if not self.gather:
            self.gather_devices.clear()


class ChunkScheduler:
    """One replica's chunk delivery state; see the module docstring for the rules."""

    def __init__(self, chunk_size_bytes: int, windows: ChunkWindows | None = None, *,
                 retain: bool = False) -> None:
        self.chunk_size_bytes = chunk_size_bytes
        self.windows = windows or ChunkWindows()
        self.retain = retain
        self._retained: dict[str, int] = {}  # artifact -> chunks (retained mode)
        self._unserved: dict[str, float] = {}  # retained artifact -> when it left serve
        self.deduplicated = 0  # needed chunks a publish already queued covers
        self.stale_requeued = 0  # chunks queued again only because their last publish was old
        self._offers: dict[str, ArtifactOffer] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._deliveries: dict[str, _Delivery] = {}
        # device -> artifact -> when it first asked (this connection; reset by reconnected)
        self._first_request: dict[str, dict[str, float]] = {}
        # what the last due() changed, for withdraw: chunk -> (its last publish before, a
        # repair?, was it lost?); artifact -> (start, chunks sent) of its round before, if
        # due() started one
        self._undo: dict[tuple[str, int], tuple[float | None, bool, bool]] = {}
        self._undo_round: dict[str, tuple[float | None, set[int]]] = {}

    @property
    def deadline(self) -> float | None:
        """When ``due`` next has something to decide (None: nothing queued)."""
        times = [t for d in self._deliveries.values()
                 if (t := d.deadline(self.windows)) is not None]
        return min(times) if times else None

    def stats(self, artifact_sha: str) -> DeliveryStats:
        d = self._deliveries.get(artifact_sha)
        return DeliveryStats() if d is None else DeliveryStats(d.published, d.rounds,
                                                               d.round_repairs)

    @property
    def published(self) -> int:
        """Chunk publishes of every artifact so far."""
        return sum(d.published for d in self._deliveries.values())

    @property
    def rounds(self) -> int:
        """Rounds started, of every artifact."""
        return sum(d.rounds for d in self._deliveries.values())

    @property
    def retained(self) -> dict[str, int]:
        """Artifacts whose chunks may be retained on the broker -> their number of chunks."""
        return dict(self._retained)

    def restore(self, retained: Mapping[str, int], now: float) -> None:
        """Artifacts retained before a restart: cleared ``linger_s`` after ``now`` unless
        served by then (their chunks count as never published)."""
        for sha, chunks in retained.items():
            self._retained[sha] = max(chunks, self._retained.get(sha, 0))
            if sha not in self._offers:
                self._unserved.setdefault(sha, now)

    def lost_retained(self) -> None:
        """The broker may have lost its retained messages: each published chunk goes out once
        more, to the first device asking for it."""
        for d in self._deliveries.values():
            d.lost = set(d.last)

    def clears(self, now: float) -> list[ChunkClear]:
        """The retained artifacts out of ``serve`` for ``linger_s``: clear their chunks now
        (each returned once; it is forgotten)."""
        out: list[ChunkClear] = []
        for sha, since in list(self._unserved.items()):
            if now - since < self.windows.linger_s:
                continue
            del self._unserved[sha]
            chunks = self._retained.pop(sha, 0)
            d = self._deliveries.get(sha)
            if d is not None:
                d.last.clear()
                d.lost.clear()
            if chunks:
                out.append(ChunkClear(sha, chunks))
        return out

    def serve(self, offers: Mapping[str, ArtifactOffer], now: float) -> None:
        """The artifacts devices may fetch now (all others are refused). A changed cap
        starts a full bucket; chunks already queued still go out, except in retained mode."""
        self._offers = dict(offers)
        for sha in self._retained:
            if sha in offers:
                self._unserved.pop(sha, None)
            elif sha not in self._unserved:
                self._unserved[sha] = now
        if self.retain:
            for sha, d in self._deliveries.items():
                if sha not in offers:
                    d.running, d.gather, d.repairs = set(), set(), set()
                    d.gather_devices.clear()
        for sha, offer in offers.items():
            rate = offer.rate_bytes_per_s
            bucket = self._buckets.get(sha)
            if rate and (bucket is None or bucket.rate != rate):
                self._buckets[sha] = TokenBucket(rate, now, self.chunk_size_bytes)
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
        w = self.windows
        first = self._first_request.setdefault(device_id, {}).setdefault(artifact_sha, now)
        d = self._deliveries.setdefault(artifact_sha, _Delivery())
        is_open = d.is_open(now, w)
        queued: set[int] = set()
        out_of_range: set[int] = set()
        for i in indices:
            if not 0 <= i < offer.chunks:
                out_of_range.add(i)
                continue
            last = d.last.get(i)
            stale = w.stale_retained_s if self.retain else w.stale_s
            if last is None or repair or (i in d.lost if self.retain else first > last):
                pass  # never published, a repair, lost, or sent before the device subscribed
            elif now - first > stale and now - last > stale:
                self.stale_requeued += 1  # asking long after a publish long ago: a lost queue
            else:
                continue  # sent while the device was subscribed: it is merely slow
            if i in d.running:
                self.deduplicated += 1
                continue
            queued.add(i)
            if repair:
                d.repairs.add(i)
                d.repair_due = _sooner(d.repair_due, now + w.repair_s)
            elif is_open and i not in d.sent_in_round:
                d.running.add(i)
                d.running_wake = _sooner(d.running_wake, now + w.repair_s)
            else:
                if i in d.gather:
                    self.deduplicated += 1
                if not d.gather:
                    d.opened = d.joined = now
                d.gather.add(i)
                if device_id not in d.gather_devices:
                    d.gather_devices.add(device_id)
                    d.joined = now
        return Queued(artifact_sha, True, tuple(sorted(queued)), tuple(sorted(out_of_range)))

    def due(self, now: float) -> list[ChunkPublish]:
        """The chunks to publish now (recorded as published at ``now``); [] before the
        deadline."""
        w = self.windows
        self._undo, self._undo_round = {}, {}
        out: list[ChunkPublish] = []
        for sha, d in self._deliveries.items():
            bucket = self._buckets.get(sha)
            gather_due = d.gather_due(w)
            if gather_due is not None and now >= gather_due and not d.is_open(now, w):
                self._undo_round[sha] = (d.round_started, d.sent_in_round)
                d.round_started, d.sent_in_round = now, set()
                d.rounds += 1
                d.running, d.gather = d.gather, set()
                d.gather_devices.clear()
                d.running_wake = now
            if d.running and d.running_wake is not None and now >= d.running_wake:
                for i in sorted(d.running):
                    if bucket is not None and not bucket.take(self.chunk_size_bytes, now):
                        break  # over the cap: the rest waits in the round
                    self._undo[(sha, i)] = (d.last.get(i), False, i in d.lost)
                    d.running.discard(i)
                    d.sent_in_round.add(i)
                    d.sent(i, now)
                    out.append(self._publish(sha, i))
                d.running_wake = now + w.repair_s if d.running else None
            if d.repairs and d.repair_due is not None and now >= d.repair_due:
                wake = now + w.repair_s
                for i in sorted(d.repairs):
                    last = d.last.get(i)
                    if last is not None and now - last < w.republish_after_s:
                        wake = max(wake, last + w.republish_after_s)
                        continue
                    if bucket is not None and not bucket.take(self.chunk_size_bytes, now):
                        break
                    self._undo[(sha, i)] = (last, True, i in d.lost)
                    d.round_repairs += 1
                    d.sent(i, now)
                    out.append(self._publish(sha, i, repair=True))
                d.repair_due = wake if d.repairs else None
        return out

    def _publish(self, sha: str, i: int, *, repair: bool = False) -> ChunkPublish:
        if not self.retain:
            return ChunkPublish(sha, i, repair=repair)
        offer = self._offers.get(sha)
        self._retained[sha] = max(self._retained.get(sha, 0), offer.chunks if offer else i + 1)
        return ChunkPublish(sha, i, retain=True, repair=repair)

    def withdraw(self, publishes: Iterable[ChunkPublish]) -> None:
        """These chunks from the last ``due`` were not sent: forget they were published and
        give their bandwidth back."""
        for p in publishes:
            key = (p.artifact_sha, p.index)
            d = self._deliveries.get(p.artifact_sha)
            if key not in self._undo or d is None:
                continue
            before, was_repair, was_lost = self._undo.pop(key)
            if before is None:
                d.last.pop(p.index, None)
            else:
                d.last[p.index] = before
            if was_lost:
                d.lost.add(p.index)
            d.published -= 1
            if was_repair:
                d.round_repairs -= 1
            else:
                d.sent_in_round.discard(p.index)
            bucket = self._buckets.get(p.artifact_sha)
            if bucket is not None:
                bucket.give(self.chunk_size_bytes)
        for sha, (started, sent) in self._undo_round.items():
            d = self._deliveries[sha]
            if not d.sent_in_round and not d.running:  # nothing of it went out
                d.round_started, d.sent_in_round = started, sent
                d.rounds -= 1
        self._undo_round = {}


def _sooner(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)
