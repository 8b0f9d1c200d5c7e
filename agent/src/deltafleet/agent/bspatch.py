"""bspatch on untrusted bytes, contained: header check here, the patch in a child process.

A BSDIFF40 patch is ``b"BSDIFF40"``, three signed 64-bit lengths (control block, diff block,
new file size; sign-magnitude little-endian as bsdiff4 writes them), then three bz2 streams
(control, diff, extra). bsdiff4 trusts all of it: a negative or lying length, or a bz2 bomb,
costs unbounded memory or worse inside the C extension. So:

1. ``check_header`` (pure, in the agent) refuses a patch whose lengths are negative, do not
   fit the patch, or whose declared output size is not the signed ``target_size_bytes``.
2. ``apply_to_file`` runs the patch in the contained decoder child every codec uses
   (``confined``: RLIMIT_AS to the device's cap, a wall-clock kill after ``timeout_s``), which
   applies it streaming (``stream_patch``): each bz2 block decompressed as it is consumed and
   bounded (control <= 24 bytes per output byte + 24, diff and extra <= the output size), the
   patch and the base read range by range from their files, the target written to a file
   the parent created.

The child's memory is a few MiB beyond the interpreter and numpy, whatever the model size:
bsdiff4's own C ``patch`` held base, the decompressed blocks and the target at once (5.7x
the model).
The whole artifact has already matched its signed sha256 before any of this runs; this
process hashes the output itself, and it is renamed into place only when it matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deltafleet.codecs import CodecError, Source, TargetMismatch
from deltafleet.codecs.bsdiff_stream import stream_patch

from . import confined

MAGIC = b"BSDIFF40"
HEADER_BYTES = 32


class PatchRefused(CodecError):
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


@dataclass(frozen=True, slots=True)
class Patched:
    sha256: str
    child_peak_rss_bytes: int  # the decoder process's own peak (0 if it did not say)


def apply_to_file(base_path: Path, patch: Source, target_size: int, dest: Path, *,
                  expect_sha256: str | None = None, max_memory_bytes: int | None = None,
                  timeout_s: float = 600.0) -> Patched:
    """Check the header here, then patch into ``dest`` in the contained decoder
    (``confined.decode_confined``); returns the output's sha256 and the child's peak memory.
    TargetMismatch when the output is not ``expect_sha256``; PatchRefused on any other
    failure; nothing is left behind."""
    head = bytes(patch.read_at(0, min(HEADER_BYTES, patch.size)))
    _, _, new = read_header(head, total_size=patch.size)
    if new != target_size:
        raise PatchRefused(f"patch header declares {new} output bytes, the manifest "
                           f"{target_size}")
    try:
        done = confined.decode_confined("bsdiff4", patch, Path(base_path), Path(dest),
                                        target_size=target_size, expect_sha256=expect_sha256,
                                        max_memory_bytes=max_memory_bytes, timeout_s=timeout_s)
    except TargetMismatch:
        raise
    except CodecError as e:
        raise PatchRefused(str(e)) from e
    return Patched(done.sha256, done.child_peak_rss_bytes)


__all__ = ["PatchRefused", "Patched", "apply_to_file", "check_header", "read_header", "stream_patch"]
