"""bspatch on untrusted bytes, contained: header check here, the patch in a child process.

A BSDIFF40 patch is ``b"BSDIFF40"``, three signed 64-bit lengths (control block, diff block,
new file size; sign-magnitude little-endian as bsdiff4 writes them), then three bz2 streams
(control, diff, extra). bsdiff4 trusts all of it: a negative or lying length, or a bz2 bomb,
costs unbounded memory or worse inside the C extension. So:

1. ``check_header`` (pure, in the agent) refuses a patch whose lengths are negative, do not
   fit the patch, or whose declared output size is not the signed ``target_size_bytes``.
2. ``apply_to_file`` runs ``_bspatch_worker.py`` as a separate interpreter (it imports nothing
   of deltafleet), which caps its own address space (RLIMIT_AS) before touching the patch and
   applies it streaming (``stream_patch``): each bz2 block decompressed as it is consumed and
   bounded (control <= 24 bytes per output byte + 24, diff and extra <= the output size), the
   base read range by range, the target written to a file this process created. The agent
   kills it after ``timeout_s``. Patch bytes go in on stdin.

The child's memory is the patch plus a few MiB, whatever the model size: bsdiff4's own C
``patch`` held base, the decompressed blocks and the target at once (5.7x the model).
The whole artifact has already matched its signed sha256 before any of this runs; this
process hashes the output itself, and it is renamed into place only when it matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deltafleet.shared import fsync_dir

from ._bspatch_worker import stream_patch
from .codecs import STREAM_PIECE_BYTES, Source, TargetMismatch, default_memory_cap_bytes

log = logging.getLogger(__name__)

MAGIC = b"BSDIFF40"
HEADER_BYTES = 32
WORKER = Path(__file__).with_name("_bspatch_worker.py")
_OVERHEAD_BYTES = 64 << 20  # interpreter + bz2 buffers, on top of the worker's own mappings
EXIT_MALFORMED = 2
EXIT_NO_MEMORY = 3


class PatchRefused(ValueError):
    """The patch is malformed, lies about its size, or broke its memory or time budget."""


def decode_int64(raw: bytes) -> int:
    """bsdiff's offtin: 63-bit magnitude little-endian, sign in the top bit."""
    value = int.from_bytes(raw, "little") & ((1 << 63) - 1)
    return -value if raw[7] & 0x80 else value


def read_header(patch: bytes | bytearray | memoryview,
                total_size: int | None = None) -> tuple[int, int, int]:
    """(control length, diff length, new size) of a BSDIFF40 patch (``patch`` holds at least
    its first 32 bytes; ``total_size`` is the whole patch's); PatchRefused if malformed."""
    total = len(patch) if total_size is None else total_size
    if len(patch) < HEADER_BYTES or bytes(patch[:8]) != MAGIC:
        raise PatchRefused("not a BSDIFF40 patch")
    ctrl, diff, new = (decode_int64(bytes(patch[i:i + 8])) for i in (8, 16, 24))
    if ctrl < 0 or diff < 0 or new < 0:
        raise PatchRefused(f"negative length in the patch header ({ctrl}, {diff}, {new})")
    if HEADER_BYTES + ctrl + diff > total:
        raise PatchRefused("patch header lengths exceed the patch")
    return ctrl, diff, new


def check_header(patch: bytes | bytearray | memoryview, target_size: int) -> None:
    _, _, new = read_header(patch)
    if new != target_size:
        raise PatchRefused(f"patch header declares {new} output bytes, the manifest "
                           f"{target_size}")


def memory_budget_bytes(base_size: int, patch_size: int, target_size: int) -> int:
    """What the worker may allocate: the patch, its copy as bytes, and streaming buffers."""
    return _OVERHEAD_BYTES + 2 * patch_size + 8 * STREAM_PIECE_BYTES


@dataclass(frozen=True, slots=True)
class Patched:
    sha256: str
    child_peak_rss_bytes: int  # the bspatch process's own peak (0 if it did not say)


def apply_to_file(base_path: Path, patch: Source, target_size: int, dest: Path, *,
                  expect_sha256: str | None = None, max_memory_bytes: int | None = None,
                  timeout_s: float = 600.0) -> Patched:
    """Patch into ``dest`` through a child process; returns the output's sha256 and the
    child's peak memory. TargetMismatch when the output is not ``expect_sha256``.

    The output is written to a temp file beside ``dest``, hashed here, and renamed to ``dest``
    (after fsync) only if it has ``target_size`` bytes and, when given, ``expect_sha256``.
    PatchRefused on any failure; nothing is left behind."""
    head = bytes(patch.read_at(0, min(HEADER_BYTES, patch.size)))
    _, _, new = read_header(head, total_size=patch.size)
    if new != target_size:
        raise PatchRefused(f"patch header declares {new} output bytes, the manifest "
                           f"{target_size}")
    need = memory_budget_bytes(base_path.stat().st_size, patch.size, target_size)
    cap = default_memory_cap_bytes() if max_memory_bytes is None else max_memory_bytes
    if need > cap:
        raise PatchRefused(f"patch needs about {need >> 20} MiB, over the {cap >> 20} MiB cap")
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    argv = [sys.executable, "-I", str(WORKER), str(base_path), tmp, str(target_size), str(need)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    try:
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=errors, env=env)
            except OSError as e:
                raise PatchRefused(f"cannot start bspatch: {e}") from e
            try:
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError):
                    for off in range(0, patch.size, STREAM_PIECE_BYTES):
                        proc.stdin.write(patch.read_at(off, min(STREAM_PIECE_BYTES,
                                                                patch.size - off)))
                    proc.stdin.close()
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired as e:
                proc.kill()
                proc.wait()
                raise PatchRefused(f"bspatch did not finish within {timeout_s:.0f} s") from e
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            errors.seek(0)
            why = errors.read().decode(errors="replace").strip().splitlines()
        detail = why[-1][:200] if why else ""
        peak = 0
        if rc == 0 and detail.startswith("peak_rss_bytes="):
            peak = int(detail.partition("=")[2] or 0)
        if rc == EXIT_NO_MEMORY or rc == -9:
            raise PatchRefused(f"bspatch exceeded its {need >> 20} MiB memory cap {detail}".strip())
        if rc != 0:
            raise PatchRefused(detail or f"bspatch exited with {rc}")
        h = hashlib.sha256()
        size = 0
        with open(tmp, "rb") as f:
            while block := f.read(STREAM_PIECE_BYTES):
                h.update(block)
                size += len(block)
        if size != target_size:
            raise PatchRefused(f"bspatch produced {size} bytes, not {target_size}")
        digest = h.hexdigest()
        if expect_sha256 is not None and digest != expect_sha256:
            raise TargetMismatch("patched output is not the signed target (sha256 differs)")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)
    log.debug("bspatch: %d bytes in a child that peaked at %d MiB", target_size, peak >> 20)
    return Patched(digest, peak)


__all__ = ["PatchRefused", "Patched", "apply_to_file", "check_header", "read_header", "stream_patch"]
