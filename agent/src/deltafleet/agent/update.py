"""The update pipeline's pure steps: verify a manifest, collect chunks, apply the artifact.

Order of checks (stop at the first failure; nothing is acted on before, the running model is
never touched by a refused update):

1. size cap of the manifest bytes (``MAX_MANIFEST_BYTES``), before parsing
2. signature: a key of the current, unexpired key list (``trust.RootTrust``) or a pinned key
3. serial: must exceed the last serial seen for that model (no replay, no rollback; going
   back is a new manifest with a higher serial). A manifest this device already accepted
   (same ``manifest_id``) is a re-delivery, not a replay.
4. expiry (no indefinite freeze)
5. device id, then hardware id binding
6. base: a delta's ``base_sha256`` must be what runs (``check_base``)
7. artifact size cap and free disk for artifact + target + margin (``check_disk``; too
   little space is ``NoSpace``, retried when space is back, never a failed manifest)
8. each chunk against its signed hash (``ChunkSet.accept``)
9. the whole artifact against its signed sha256 and size (``ChunkSet.assemble``)
10. decode in a contained child process with the device's memory cap and a time limit
    (``confined``), every header field bounded before allocation (bsdiff4: the patch header's
    output length must equal ``target_size_bytes`` before the child starts)
11. the result against the signed target sha256 and size (``apply_to_file``): the target is
    decoded into a temp file beside its content address while being hashed, and renamed into
    place only when it matches. No codec holds the target (or the artifact) in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deltafleet import codecs
from deltafleet.codecs import ChunkSource
from deltafleet.shared import (
    Manifest,
    WireError,
    atomic_write_bytes,
    sha256_bytes,
)

from . import bspatch, confined
from .errors import ArtifactRefused, DecodeLimitHit, NoSpace, UpdateRejected, is_no_space
from .machine import check_base as check_base
from .machine import check_disk as check_disk
from .machine import space_needed as space_needed
from .trust import ManifestVerifier, PinnedKeys

# A 4 GiB artifact (the default max_artifact_bytes) lists 65,536 chunk hashes in 64 KiB chunks,
# ~4.4 MB of JSON; golden inputs add at most ~350 KB.
MAX_MANIFEST_BYTES = 6 << 20


def verify_manifest(
    data: bytes,
    trust: ManifestVerifier | list[Ed25519PublicKey],
    *,
    device_id: str,
    hardware_id: str | None = None,
    last_serial: int | None = None,
    known_ids: Collection[str] = (),
    now: float | None = None,
    check_expiry: bool = True,
) -> Manifest:
    """Steps 1-5: the manifest, if it is signed by a trusted key, newer than the last one seen
    (``last_serial``; None skips the check), unexpired and meant for this device and hardware.

    Raises UpdateRejected with the reason of the first failed check.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise UpdateRejected(f"manifest of {len(data)} bytes exceeds the "
                             f"{MAX_MANIFEST_BYTES}-byte cap")
    t = now if now is not None else time.time()
    verifier = PinnedKeys(trust) if isinstance(trust, list) else trust
    payload = verifier.verify(data, int(t), MAX_MANIFEST_BYTES)
    try:
        manifest = Manifest.from_wire(payload)
    except WireError as e:
        raise UpdateRejected(f"manifest refused: {e}") from e
    if (last_serial is not None and manifest.serial <= last_serial
            and manifest.manifest_id not in known_ids):
        raise UpdateRejected(f"replayed or rolled-back manifest: serial {manifest.serial} "
                             f"<= {last_serial}, the last one seen")
    if check_expiry and manifest.expires_at < t:
        raise UpdateRejected(f"manifest has expired (at {manifest.expires_at})")
    if manifest.device_id != device_id:
        raise UpdateRejected(f"manifest is for device {manifest.device_id}, not {device_id}")
    if manifest.hardware_id is not None and manifest.hardware_id != hardware_id:
        raise UpdateRejected(f"manifest is for hardware {manifest.hardware_id[:40]!r}, "
                             f"this device is {str(hardware_id)[:40]!r}")
    return manifest


def chunk_bytes_on_disk(directory: Path) -> int:
    """Bytes of the chunk files (not temp files) in a download directory."""
    if not directory.is_dir():
        return 0
    return sum(f.stat().st_size for f in directory.iterdir() if f.name.isdigit())


class ChunkSet:
    """Verified chunks of one artifact on disk; survives restarts (resume)."""

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        self.art = manifest.artifact
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.have: set[int] = set()
        self.rejected = 0
        for f in self.dir.iterdir():
            if not f.name.isdigit():  # a temp file a crash or a full disk left behind
                f.unlink(missing_ok=True)
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
        try:
            atomic_write_bytes(self.dir / str(index), data)
        except OSError as e:
            if is_no_space(e):
                raise NoSpace(f"disk full writing chunk {index} of {self.art.sha256[:12]} "
                              f"({e.strerror}); retrying when space is back") from e
            raise
        self.have.add(index)
        return True

    def bytes_received(self) -> int:
        return sum((self.dir / str(i)).stat().st_size for i in self.have)

    def source(self) -> ChunkSource:
        """The whole artifact, verified against its signed sha256 and size, read in place
        from the chunk files (never assembled in memory or copied on disk)."""
        src = ChunkSource(self.dir, self.total, self.art.chunk_size_bytes)
        h = hashlib.sha256()
        size = 0
        try:
            for i in range(self.total):
                data = (self.dir / str(i)).read_bytes()
                if i < self.total - 1 and len(data) != self.art.chunk_size_bytes:
                    size = -1  # read_at maps offsets to chunks by the fixed chunk size
                    break
                h.update(data)
                size += len(data)
        except FileNotFoundError as e:
            raise UpdateRejected(f"a chunk vanished from disk: {e.filename}") from e
        if size != self.art.size_bytes or h.hexdigest() != self.art.sha256:
            for i in range(self.total):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / str(i))
            self.have.clear()
            raise UpdateRejected("artifact hash mismatch after assembly")
        src.size = size
        return src

    def assemble(self) -> bytes:
        """The verified artifact in memory (small artifacts, tests)."""
        src = self.source()
        return bytes(src.read_at(0, src.size))


def apply_to_file(
    manifest: Manifest,
    artifact: codecs.Source,
    base_path: Path | None,
    dest: Path,
    *,
    max_memory_bytes: int | None = None,
    timeout_s: float = 600.0,
) -> Path:
    """Steps 10-11: decode a verified artifact into ``dest`` (the target's content address),
    streamed and hashed on the way; ``dest`` appears (durably) only if the result is the
    signed target. Raises UpdateRejected; nothing is left behind on failure.

    Every codec decodes in a contained child process (``confined``) within
    ``max_memory_bytes`` (default: half the machine's memory) and ``timeout_s``; a decode
    predicted to exceed the cap is refused before it starts, and one that hits a limit is
    killed. bsdiff4 patches are started only once their header declares the signed size.
    """
    codec = manifest.artifact.codec
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if codec == codecs.BSDIFF4:
            if base_path is None or not Path(base_path).is_file():
                raise UpdateRejected("bsdiff4 patch needs the base model, which is not on disk")
            bspatch.apply_to_file(Path(base_path), artifact, manifest.target_size_bytes, dest,
                                  expect_sha256=manifest.target_sha256,
                                  max_memory_bytes=max_memory_bytes, timeout_s=timeout_s)
        else:
            if codec not in codecs.CODECS:
                raise codecs.UnknownCodec(codec)
            confined.decode_confined(codec, artifact, base_path, dest,
                                     target_size=manifest.target_size_bytes,
                                     expect_sha256=manifest.target_sha256,
                                     max_memory_bytes=max_memory_bytes, timeout_s=timeout_s)
    except codecs.TargetMismatch as e:
        raise ArtifactRefused("target hash mismatch: patched model is not the signed "
                              "target") from e
    except bspatch.PatchRefused as e:
        cause = e.__cause__
        if isinstance(cause, confined.DecodeEnvironmentError):
            raise UpdateRejected(f"bsdiff4 patch not applied: {e}") from e
        if isinstance(cause, (codecs.MemoryCapExceeded, confined.DecodeTimeout)):
            raise DecodeLimitHit(f"bsdiff4 patch refused: {e}") from e
        raise ArtifactRefused(f"bsdiff4 patch refused: {e}") from e
    except codecs.UnknownCodec as e:
        raise UpdateRejected(f"unknown codec {codec!r}") from e
    except confined.DecodeEnvironmentError as e:
        raise UpdateRejected(f"{codec} patch not applied: {e}") from e
    except (codecs.MemoryCapExceeded, confined.DecodeTimeout) as e:
        raise DecodeLimitHit(f"{codec} patch refused: {e}") from e
    except codecs.CodecError as e:
        raise ArtifactRefused(f"{codec} patch failed: {e}") from e
    except MemoryError as e:
        raise UpdateRejected(f"{codec} patch ran out of memory") from e
    return dest


def apply_artifact(
    manifest: Manifest,
    artifact: bytes | bytearray,
    base_path: Path | None,
    *,
    max_memory_bytes: int | None = None,
    timeout_s: float = 600.0,
) -> bytes:
    """``apply_to_file`` for an artifact in memory, returning the verified target bytes (the
    simulator and tests; the agent streams from its chunk files)."""
    with tempfile.TemporaryDirectory(prefix="deltafleet-apply-") as tmp:
        dest = apply_to_file(manifest, codecs.BytesSource(artifact), base_path,
                             Path(tmp) / "target", max_memory_bytes=max_memory_bytes,
                             timeout_s=timeout_s)
        return dest.read_bytes()
