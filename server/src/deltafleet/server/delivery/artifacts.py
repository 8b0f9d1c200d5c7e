"""The chunk view of the artifacts the server ships, over one ``store.BlobVerifier``.

A manifest names an artifact's chunk hashes and the chunk scheduler needs its chunk count;
both come from ``hashes``, which hashes a blob once per stat of its file (the verifier's
cache) and refuses a blob that does not hash to its name. ``read`` returns a chunk's bytes
only when they match their hash. Manifest building, the daemon and the controller share one
``ArtifactChunks`` (and so one verifier), so a corruption found while serving a chunk is seen
by the controller on its next tick.
"""

from __future__ import annotations

from ..errors import BlobCorrupt
from ..store import BlobVerifier

__all__ = ["ArtifactChunks"]


class ArtifactChunks:
    def __init__(self, verifier: BlobVerifier) -> None:
        self.verifier = verifier

    @property
    def chunk_size_bytes(self) -> int:
        return self.verifier.chunk_size_bytes

    def hashes(self, sha: str) -> tuple[str, ...]:
        """The chunk hashes of a blob proven intact; BlobCorrupt if it is not."""
        check = self.verifier.check(sha)
        if not check.ok:
            raise BlobCorrupt(f"server blob {sha[:12]} {check.problem}")
        return check.chunk_hashes

    def count(self, sha: str) -> int:
        """How many chunks the blob has (BlobCorrupt if it is not intact)."""
        return len(self.hashes(sha))

    def read(self, sha: str, index: int) -> bytes | None:
        """Chunk ``index``, checked against its hash; None when the blob is not intact (the
        verifier then reports it)."""
        return self.verifier.chunk(sha, index)
