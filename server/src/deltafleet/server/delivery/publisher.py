"""Chunk I/O: what the pure ``chunks.ChunkScheduler`` decides, read from the blob store and
published on MQTT.

``ChunkPublisher`` owns the scheduler and the durable list of retained artifacts
(``retained.RetainedList``); the server's loop hands it chunk requests (``request``), the
artifacts the rollouts serve (``serve``) and, every tick, the time (``flush``). Each chunk is
read through ``artifacts.ArtifactChunks`` and checked against its hash before it is sent: a
blob that is not intact sends none of its chunks (the controller holds its rollout). Its
counters land in the server's ``ServerStats`` and per kind (``delta``, ``full``, ``repair``)
in the metrics counters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from deltafleet.shared import ChunkRequest, Topics

from .artifacts import ArtifactChunks
from .chunks import ArtifactOffer, ChunkScheduler, ChunkWindows
from .retained import RetainedList

__all__ = ["ChunkPublisher", "Publisher"]

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """What ChunkPublisher needs of the MQTT client."""

    def publish(self, topic: str, payload: bytes, *, qos: int = ..., retain: bool = ...) -> Any:
        ...


class ChunkPublisher:
    def __init__(self, *, artifacts: ArtifactChunks, topics: Topics, windows: ChunkWindows,
                 retain: bool, retained_path: Path, stats: Any, counters: Any,
                 kind_of: Callable[[str], str | None], now: float) -> None:
        self.artifacts = artifacts
        self.topics = topics
        self.stats = stats
        self.counters = counters
        self.kind_of = kind_of  # "delta" or "full" by artifact sha; None: cannot tell now
        self.scheduler = ChunkScheduler(artifacts.chunk_size_bytes, windows, retain=retain)
        self.retained = RetainedList(retained_path)
        self.scheduler.restore(self.retained.load(), now)
        self._kinds: dict[str, str] = {}

    def request(self, device_id: str, req: ChunkRequest, now: float) -> None:
        """Queue the chunks this request needs published (rules: ``chunks``)."""
        queued = self.scheduler.request(device_id, req.artifact_sha256, req.indices, now,
                                        repair=req.repair)
        if not queued.known:
            log.warning("device %s asked for unknown artifact %s", device_id,
                        req.artifact_sha256[:12])

    def serve(self, servable: Mapping[str, int | None], now: float) -> None:
        """The artifacts served now (sha -> chunk rate or None), their chunk counts read."""
        self.scheduler.serve({sha: ArtifactOffer(self.artifacts.count(sha), rate or 0)
                              for sha, rate in servable.items()}, now)

    def flush(self, mqtt: Publisher, now: float, *, connected: bool) -> None:
        """Publish the chunks due and, while connected, clear the retained chunks of the
        artifacts no longer served; then record the retained list."""
        due = self.scheduler.due(now)
        self.stats.chunks_deduplicated = self.scheduler.deduplicated
        self.stats.chunk_rounds = self.scheduler.rounds
        broken: set[str] = set()
        unsent = []
        for p in due:
            data = None if p.artifact_sha in broken else self.artifacts.read(p.artifact_sha,
                                                                              p.index)
            if data is None:
                broken.add(p.artifact_sha)
                unsent.append(p)
                continue
            mqtt.publish(self.topics.chunk(p.artifact_sha, p.index), data, qos=1,
                         retain=p.retain)
            self.stats.chunks_published += 1
            self.stats.chunk_bytes_published += len(data)
            kind = "repair" if p.repair else self._kind(p.artifact_sha)
            self.counters.published_bytes[kind] += len(data)
            self.counters.published_chunks[kind] += 1
        self.scheduler.withdraw(unsent)
        if connected:
            for c in self.scheduler.clears(now):
                for i in range(c.chunks):
                    mqtt.publish(self.topics.chunk(c.artifact_sha, i), b"", qos=1, retain=True)
                self.stats.chunks_cleared += c.chunks
                log.info("cleared the %d retained chunks of artifact %s", c.chunks,
                         c.artifact_sha[:12])
        try:
            self.retained.save(self.scheduler.retained)
        except OSError as e:
            log.error("cannot record the retained chunk list %s: %s", self.retained.path, e)

    def _kind(self, sha: str) -> str:
        kind = self._kinds.get(sha)
        if kind is None:  # an artifact's kind never changes: asked once it is known
            kind = self.kind_of(sha)
            if kind is None:
                return "full"
            self._kinds[sha] = kind
        return kind
