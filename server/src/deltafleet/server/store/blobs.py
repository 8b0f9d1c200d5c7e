"""Content-addressed blob store on disk: ``root/<sha[:2]>/<sha>``.

Writes are durable and atomic (``deltafleet.shared.staged_file``: temp file in ``root``, hashed
while written, fsync, os.replace, fsync dirs) and stream in bounded memory, so a reader sees
either no blob or the complete one.

A blob's name is its sha256, so the store can prove a blob intact: ``BlobVerifier`` re-hashes
it (whole sha256 and the chunk hashes a manifest carries, in one read) once per
(inode, size, mtime, ctime) and checks every chunk it hands out against those chunk hashes, so
neither a rewritten file nor bit rot under an unchanged stat is ever shipped.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from deltafleet.shared import StagedMismatch, fsync_dir, is_sha256, sha256_bytes, staged_file

from ..errors import BlobMismatch, BlobNameInvalid

_READ_BYTES = 1 << 20


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise BlobNameInvalid(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_file(self, src: Path) -> tuple[str, int]:
        """Copy ``src`` into the store; returns (sha256, size_bytes)."""
        with open(src, "rb") as f:
            return self._put_stream(f)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        sha = hashlib.sha256(data).hexdigest()
        if self.has(sha) and _hashes_to(self.path(sha), sha):
            return sha, len(data)
        return self._put_chunks([data])

    def restore_file(self, src: Path, sha256: str) -> int:
        """Put ``src`` in place of the blob ``sha256`` even when a (corrupt) file of that name
        exists; refuses (BlobMismatch, nothing written) a file whose content is another sha256."""
        with open(src, "rb") as f:
            blocks = iter(lambda: f.read(_READ_BYTES), b"")
            return self._put_chunks(blocks, expect=sha256)[1]

    def delete(self, sha256: str) -> bool:
        """Remove a blob; True if it existed. Only for undoing a write nothing references."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.path(sha256).parent)
        return True

    def _put_stream(self, f: BinaryIO) -> tuple[str, int]:
        return self._put_chunks(iter(lambda: f.read(_READ_BYTES), b""))

    def _put_chunks(self, chunks: Iterable[bytes], *,
                    expect: str | None = None) -> tuple[str, int]:
        self.root.mkdir(parents=True, exist_ok=True)

        def dest_of(sha: str) -> Path | None:
            dest = self.path(sha)
            if expect is None and dest.is_file() and _hashes_to(dest, sha):
                return None  # an intact copy is already there
            dest.parent.mkdir(exist_ok=True)
            return dest

        try:
            with staged_file(dest_of, expect_sha256=expect, temp_dir=self.root) as out:
                for block in chunks:
                    out.write(block)
        except StagedMismatch as e:
            raise BlobMismatch(f"the file hashes to {out.sha256[:12]}, not "
                               f"{(expect or '')[:12]}") from e
        return out.sha256, out.size


def _hashes_to(path: Path, sha256: str) -> bool:
    """An existing blob is kept only when it is intact: re-adding a file heals a corrupt copy."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            h.update(block)
    return h.hexdigest() == sha256


@dataclass(frozen=True, slots=True)
class BlobCheck:
    """What the bytes on disk under a blob's name are: ``ok`` when they hash to the name."""

    sha256: str
    ok: bool
    problem: str = ""  # "missing" | "corrupt: it hashes to <sha12>" | "unreadable: ..."
    chunk_hashes: tuple[str, ...] = ()  # of the verified bytes (empty unless ok)

    @property
    def missing(self) -> bool:
        return self.problem == "missing"


class BlobVerifier:
    """Proves blobs intact before they are shipped. ``check`` hashes a blob once per stat key
    (inode, size, mtime_ns, ctime_ns: a rewrite or a replace changes it, and ctime cannot be
    set back by a user) and caches the verdict with the chunk hashes; ``chunk`` re-hashes each
    chunk it reads against them, which costs one sha256 of a chunk already in memory and
    catches corruption that leaves the stat alone (bit rot, a block device error).

    Verdicts found bad are queued for ``take_new_problems`` so the controller can report each
    corruption once, with what depends on the blob. Thread-safe."""

    def __init__(self, blobs: BlobStore, chunk_size_bytes: int) -> None:
        self.blobs = blobs
        self.chunk_size_bytes = chunk_size_bytes
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int, int], BlobCheck]] = {}
        self._new_problems: dict[str, BlobCheck] = {}
        self.hashed_bytes = 0  # bytes read to verify whole blobs (a cache miss each)

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int, int, int]:
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def check(self, sha256: str) -> BlobCheck:
        path = self.blobs.path(sha256)
        try:
            key = self._key(os.stat(path))
        except FileNotFoundError:
            return self._verdict(sha256, None, BlobCheck(sha256, False, "missing"))
        except OSError as e:
            return self._verdict(sha256, None, BlobCheck(sha256, False, f"unreadable: {e}"))
        with self._lock:
            cached = self._cache.get(sha256)
        if cached is not None and cached[0] == key:
            return cached[1]
        whole = hashlib.sha256()
        chunks: list[str] = []
        try:
            with open(path, "rb") as f:
                while block := f.read(self.chunk_size_bytes):
                    whole.update(block)
                    chunks.append(sha256_bytes(block))
                    self.hashed_bytes += len(block)
        except OSError as e:
            return self._verdict(sha256, key, BlobCheck(sha256, False, f"unreadable: {e}"))
        actual = whole.hexdigest()
        if actual != sha256:
            return self._verdict(sha256, key, BlobCheck(
                sha256, False, f"corrupt: it hashes to {actual[:12]}"))
        return self._verdict(sha256, key, BlobCheck(
            sha256, True, chunk_hashes=tuple(chunks or [sha256_bytes(b"")])))

    def intact(self, sha256: str) -> bool:
        return self.check(sha256).ok

    def chunk(self, sha256: str, index: int) -> bytes | None:
        """Chunk ``index`` of a verified blob, or None (and the blob marked corrupt) when the
        blob or this chunk does not hash to what it must."""
        check = self.check(sha256)
        if not check.ok or index >= len(check.chunk_hashes):
            return None
        path = self.blobs.path(sha256)
        try:
            with open(path, "rb") as f:
                key = self._key(os.fstat(f.fileno()))
                f.seek(index * self.chunk_size_bytes)
                data = f.read(self.chunk_size_bytes)
        except OSError as e:
            self._verdict(sha256, None, BlobCheck(sha256, False, f"unreadable: {e}"))
            return None
        if sha256_bytes(data) != check.chunk_hashes[index]:
            self._verdict(sha256, key, BlobCheck(
                sha256, False, f"corrupt: chunk {index} does not match its hash"))
            return None
        return data

    def forget(self, sha256: str) -> None:
        """Drop the cached verdict (after a repair wrote the blob again)."""
        with self._lock:
            self._cache.pop(sha256, None)

    def take_new_problems(self) -> list[BlobCheck]:
        with self._lock:
            out, self._new_problems = list(self._new_problems.values()), {}
        return out

    def _verdict(self, sha256: str, key: tuple[int, int, int, int] | None,
                 check: BlobCheck) -> BlobCheck:
        with self._lock:
            before = self._cache.get(sha256)
            was_bad = before is not None and not before[1].ok and before[0] == key
            if key is not None:
                self._cache[sha256] = (key, check)
            else:  # missing or unreadable: remember as bad under no stat key
                self._cache[sha256] = ((-1, -1, -1, -1), check)
            if not check.ok and not was_bad and not (
                    before is not None and not before[1].ok and key is None
                    and before[0] == (-1, -1, -1, -1)):
                self._new_problems[sha256] = check
        return check
