"""sha256 helpers and the chunking rule shared by server and agent."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

DEFAULT_CHUNK_SIZE_BYTES = 64 * 1024
_READ_BYTES = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            h.update(block)
    return h.hexdigest()


def chunk_count(size_bytes: int, chunk_size_bytes: int) -> int:
    return max(1, -(-size_bytes // chunk_size_bytes))


def iter_chunks(path: Path, chunk_size_bytes: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(chunk_size_bytes):
            yield block


def chunk_hashes_file(path: Path, chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES) -> list[str]:
    hashes = [sha256_bytes(c) for c in iter_chunks(path, chunk_size_bytes)]
    return hashes or [sha256_bytes(b"")]


def read_chunk(path: Path, index: int, chunk_size_bytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(index * chunk_size_bytes)
        return f.read(chunk_size_bytes)


def is_sha256(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(c in "0123456789abcdef" for c in value)
    )
