"""Content-addressed blob store on disk: ``root/<sha[:2]>/<sha>``.

Writes are durable and atomic (temp file in ``root`` -> fsync -> os.replace -> fsync dirs) and
stream in bounded memory, so a reader sees either no blob or the complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from deltafleet.shared import fsync_dir, is_sha256

_READ_BYTES = 1 << 20


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_file(self, src: Path) -> tuple[str, int]:
        """Copy ``src`` into the store; returns (sha256, size_bytes)."""
        with open(src, "rb") as f:
            return self._put_stream(f)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        sha = hashlib.sha256(data).hexdigest()
        if self.has(sha):
            return sha, len(data)
        return self._put_chunks([data])

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

    def _put_chunks(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-", suffix=".tmp")
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for block in chunks:
                    h.update(block)
                    size += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            sha = h.hexdigest()
            dest = self.path(sha)
            if dest.is_file():
                os.unlink(tmp)
                return sha, size
            dest.parent.mkdir(exist_ok=True)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(dest.parent)
        fsync_dir(self.root)
        return sha, size
