"""Durable writes: temp file in the same directory -> fsync -> os.replace -> fsync directory.

After a power loss a reader sees either the old file or the complete new one, never a mix.
``staged_file`` is the one implementation of that sequence: it hashes and counts what is
written, and puts the file in place only when it has the expected size and sha256
(``StagedMismatch`` otherwise). Whatever goes wrong, the temp file is removed and ``dest`` is
left as it was. ``atomic_write_bytes``, ``atomic_write_json`` and ``atomic_copy`` are its
common uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import StagedMismatch

_COPY_BYTES = 1 << 20


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedFile:
    """The temp file of a ``staged_file`` block. ``write`` hashes and counts as it writes;
    bytes another process wrote to ``path`` are taken in with ``rehash``."""

    def __init__(self, fd: int, path: Path, expect_size: int | None) -> None:
        self.path = path
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._expect_size = expect_size
        self.size = 0

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; StagedMismatch as soon as it runs past the expected size."""
        if self._expect_size is not None and self.size + len(data) > self._expect_size:
            raise StagedMismatch("size", f"is longer than the expected {self._expect_size} "
                                         "bytes")
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def rehash(self) -> None:
        """Hash and count the bytes now at ``path`` (written there by someone else)."""
        self._file.flush()
        self._hash, self.size = hashlib.sha256(), 0
        with open(self.path, "rb") as f:
            while block := f.read(_COPY_BYTES):
                self._hash.update(block)
                self.size += len(block)

    def _discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _seal(self, expect_sha256: str | None, mode: int) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._expect_size is not None and self.size != self._expect_size:
            raise StagedMismatch("size", f"has {self.size} bytes, not the expected "
                                         f"{self._expect_size}")
        if expect_sha256 is not None and self.sha256 != expect_sha256:
            raise StagedMismatch("sha256", f"hashes to {self.sha256[:12]}, not the expected "
                                           f"{expect_sha256[:12]}")
        os.chmod(self.path, mode)


@contextlib.contextmanager
def staged_file(
    dest: Path | Callable[[str], Path | None],
    *,
    expect_sha256: str | None = None,
    expect_size: int | None = None,
    mode: int = 0o644,
    temp_dir: Path | None = None,
) -> Iterator[StagedFile]:
    """Write a file durably: the block writes to the yielded ``StagedFile``; when it ends
    without an exception the file is fsynced, checked (``expect_size``, ``expect_sha256``:
    StagedMismatch, nothing written), moved to ``dest`` with ``os.replace`` and the directory
    fsynced. On any exception the temp file is removed and ``dest`` is untouched.

    ``dest`` may be a function of the content's sha256 (a content-addressed store), given
    ``temp_dir`` on the same filesystem; it returns where the file goes, or None to drop it
    (an intact copy is already there)."""
    if callable(dest):
        if temp_dir is None:
            # a caller's bug, not bad input: stays builtin (test_error_root)
            raise TypeError("a dest computed from the content needs temp_dir")
        where = Path(temp_dir)
        prefix = ".incoming-"
    else:
        dest = Path(dest)
        where = Path(temp_dir) if temp_dir is not None else dest.parent
        prefix = f".{dest.name}."
    fd, tmp = tempfile.mkstemp(dir=where, prefix=prefix, suffix=".tmp")
    staged = StagedFile(fd, Path(tmp), expect_size)
    try:
        yield staged
        staged._seal(expect_sha256, mode)
        final = dest(staged.sha256) if callable(dest) else dest
        if final is None:
            os.unlink(tmp)
            return
        os.replace(tmp, final)
    except BaseException:
        staged._discard()
        raise
    fsync_dir(final.parent)
    if final.parent != where:
        fsync_dir(where)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path, mode=mode) as out:
        out.write(data)


def atomic_write_json(path: Path, value: Any, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode(), mode=mode)


def atomic_copy(src: Path, dst: Path, *, mode: int = 0o644) -> None:
    """Copy ``src`` to ``dst`` durably without holding the whole file in memory."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(dst, mode=mode) as out, open(src, "rb") as inp:
        while block := inp.read(_COPY_BYTES):
            out.write(block)


__all__ = ["StagedFile", "StagedMismatch", "atomic_copy", "atomic_write_bytes",
           "atomic_write_json", "fsync_dir", "staged_file"]
