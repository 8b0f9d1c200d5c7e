"""Random access to a delta or a base: what every decoder reads from.

A ``Source`` has a ``size`` and ``read_at(offset, length)``; a read outside ``[0, size)`` is a
``CodecError``, never a short read. ``FileSource`` holds only the range asked for in memory,
``ChunkSource`` reads an artifact stored as the agent's verified chunk files, and
``SourceReader`` gives a stream decompressor the ``read(n)`` it wants.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from .errors import CodecError


class Source(Protocol):
    size: int

    def read_at(self, offset: int, length: int) -> bytes | memoryview: ...


class BytesSource:
    """Random access to bytes already in memory (no copy)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self.size = len(self._view)

    def read_at(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CodecError(f"range {offset}+{length} is outside the data ({self.size} bytes)")
        return self._view[offset : offset + length]


class FileSource:
    """Random access to a file with pread: nothing but the range asked for is in memory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CodecError(f"range {offset}+{length} is outside the file ({self.size} bytes)")
        out = os.pread(self._fd, length, offset)
        while len(out) < length:  # pread may return short on some filesystems
            out += os.pread(self._fd, length - len(out), offset + len(out))
        return out

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChunkSource:
    """Random access to an artifact stored as fixed-size chunk files ``0``, ``1``, ... (the
    agent's verified download; ``size`` is set once the whole artifact has been checked)."""

    def __init__(self, directory: Path, count: int, chunk_size: int, size: int = 0) -> None:
        self.dir = Path(directory)
        self.count = count
        self.chunk_size = chunk_size
        self.size = size

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CodecError(f"range {offset}+{length} is outside the artifact "
                             f"({self.size} bytes)")
        parts = []
        while length > 0:
            i, rel = divmod(offset, self.chunk_size)
            n = min(length, self.chunk_size - rel)
            with open(self.dir / str(i), "rb") as f:
                f.seek(rel)
                part = f.read(n)
            if len(part) != n:
                raise CodecError(f"chunk {i} changed on disk")
            parts.append(part)
            offset += n
            length -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)


class SourceReader:
    """A file-like ``read(n)`` over a Source, for stream decompressors."""

    def __init__(self, source: Source) -> None:
        self._src = source
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        left = self._src.size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        out = bytes(self._src.read_at(self._pos, n))
        self._pos += n
        return out


__all__ = ["BytesSource", "ChunkSource", "FileSource", "Source", "SourceReader"]
