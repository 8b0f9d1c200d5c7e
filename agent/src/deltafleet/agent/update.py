"""The update pipeline's pure-ish steps: verify a manifest, collect chunks, apply the artifact.

Order of checks for a manifest (stop at the first failure, act on nothing before):
signature -> payload shape -> device binding -> expiry -> serial (no replay) -> base matches
what runs -> artifact size cap. Chunks are checked one by one against the signed chunk list;
the whole artifact against its signed sha256 before bspatch ever sees it; the patched result
against the signed target sha256 and size before it is staged.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deltafleet.shared import (
    Manifest,
    VerificationError,
    WireError,
    atomic_write_bytes,
    sha256_bytes,
    verify_envelope,
)

from . import codecs
from .errors import UpdateRejected
from .store import InstalledModel

MAX_MANIFEST_BYTES = 1 << 20


def verify_manifest(
    data: bytes,
    trusted: list[Ed25519PublicKey],
    *,
    device_id: str,
    now: float | None = None,
    max_artifact_bytes: int = 4 << 30,
) -> Manifest:
    """Return the manifest if it is signed by a trusted key and meant for this device."""
    try:
        payload = verify_envelope(data, trusted, max_bytes=MAX_MANIFEST_BYTES)
        manifest = Manifest.from_wire(payload)
    except (VerificationError, WireError) as e:
        raise UpdateRejected(f"manifest refused: {e}") from e
    if manifest.device_id != device_id:
        raise UpdateRejected(f"manifest is for device {manifest.device_id}, not {device_id}")
    if manifest.expires_at < (now if now is not None else time.time()):
        raise UpdateRejected("manifest has expired")
    if manifest.artifact.size_bytes > max_artifact_bytes:
        raise UpdateRejected(f"artifact of {manifest.artifact.size_bytes} bytes exceeds the cap")
    return manifest


def check_base(manifest: Manifest, current: InstalledModel | None) -> None:
    if manifest.artifact.kind != "delta":
        return
    running = current.sha256 if current else None
    if running != manifest.base_sha256:
        raise UpdateRejected(
            f"base mismatch: delta is from {str(manifest.base_sha256)[:12]}, "
            f"device runs {str(running)[:12]}"
        )


class ChunkSet:
    """Verified chunks of one artifact on disk; survives restarts (resume)."""

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        self.art = manifest.artifact
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.have: set[int] = set()
        self.rejected = 0
        for f in self.dir.iterdir():
            if not f.name.isdigit():
                continue
            i = int(f.name)
            if i < len(self.art.chunks) and sha256_bytes(f.read_bytes()) == self.art.chunks[i]:
                self.have.add(i)
            else:
                f.unlink(missing_ok=True)
        self.reused = len(self.have)

    @property
    def total(self) -> int:
        return len(self.art.chunks)

    def missing(self) -> list[int]:
        return [i for i in range(self.total) if i not in self.have]

    @property
    def complete(self) -> bool:
        return len(self.have) == self.total

    def accept(self, index: int, data: bytes) -> bool:
        """Store a chunk if it is the one the manifest lists; False for tampered or stray."""
        if index >= self.total or index in self.have:
            return False
        if len(data) > self.art.chunk_size_bytes or sha256_bytes(data) != self.art.chunks[index]:
            self.rejected += 1
            return False
        atomic_write_bytes(self.dir / str(index), data)
        self.have.add(index)
        return True

    def bytes_received(self) -> int:
        return sum((self.dir / str(i)).stat().st_size for i in self.have)

    def assemble(self) -> bytes:
        data = b"".join((self.dir / str(i)).read_bytes() for i in range(self.total))
        if len(data) != self.art.size_bytes or sha256_bytes(data) != self.art.sha256:
            for i in range(self.total):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / str(i))
            self.have.clear()
            raise UpdateRejected("artifact hash mismatch after assembly")
        return data


def apply_artifact(
    manifest: Manifest,
    artifact: bytes,
    base_path: Path | None,
    *,
    max_memory_bytes: int | None = None,
) -> bytes:
    """Turn a verified artifact into the target model bytes, verified against the manifest.

    Every codec of ``codecs`` is decoded within ``max_memory_bytes`` (default: half the
    machine's memory); an unknown codec or a decode over the cap is refused before any work.
    """
    try:
        target = codecs.decode(
            manifest.artifact.codec,
            artifact,
            base_path,
            target_size=manifest.target_size_bytes,
            max_memory_bytes=max_memory_bytes,
        )
    except codecs.UnknownCodec as e:
        raise UpdateRejected(f"unknown codec {manifest.artifact.codec!r}") from e
    except codecs.CodecError as e:
        raise UpdateRejected(f"{manifest.artifact.codec} patch failed: {e}") from e
    except MemoryError as e:
        raise UpdateRejected(f"{manifest.artifact.codec} patch ran out of memory") from e
    if len(target) != manifest.target_size_bytes or sha256_bytes(target) != manifest.target_sha256:
        raise UpdateRejected("target hash mismatch: patched model is not the signed target")
    return target  # type: ignore[return-value]  # a bytearray: no copy of a large model
