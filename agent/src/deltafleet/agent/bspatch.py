"""bspatch on untrusted bytes, contained: header check here, the patch in a child process.

A BSDIFF40 patch is ``b"BSDIFF40"``, three signed 64-bit lengths (control block, diff block,
new file size; sign-magnitude little-endian as bsdiff4 writes them), then three bz2 streams
(control, diff, extra). bsdiff4 trusts all of it: a negative or lying length, or a bz2 bomb,
costs unbounded memory or worse inside the C extension. So:

1. ``check_header`` (pure, in the agent) refuses a patch whose lengths are negative, do not
   fit the patch, or whose declared output size is not the signed ``target_size_bytes``.
2. ``apply`` runs ``_bspatch_worker.py`` as a separate interpreter (it imports nothing of
   deltafleet), which caps its own address space (RLIMIT_AS) before touching the patch,
   decompresses each bz2 block with a bound (control <= 24 bytes per output byte + 24, diff
   and extra <= the output size), then calls bsdiff4's C core. The agent kills it after
   ``timeout_s``. Patch bytes go in on stdin, the target comes back on stdout.

The whole artifact has already matched its signed sha256 before any of this runs, and the
result is checked against the signed target sha256 afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .codecs import default_memory_cap_bytes

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


def read_header(patch: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(control length, diff length, new size) of a BSDIFF40 patch; PatchRefused if malformed."""
    if len(patch) < HEADER_BYTES or bytes(patch[:8]) != MAGIC:
        raise PatchRefused("not a BSDIFF40 patch")
    ctrl, diff, new = (decode_int64(bytes(patch[i:i + 8])) for i in (8, 16, 24))
    if ctrl < 0 or diff < 0 or new < 0:
        raise PatchRefused(f"negative length in the patch header ({ctrl}, {diff}, {new})")
    if HEADER_BYTES + ctrl + diff > len(patch):
        raise PatchRefused("patch header lengths exceed the patch")
    return ctrl, diff, new


def check_header(patch: bytes | bytearray | memoryview, target_size: int) -> None:
    _, _, new = read_header(patch)
    if new != target_size:
        raise PatchRefused(f"patch header declares {new} output bytes, the manifest "
                           f"{target_size}")


def memory_budget_bytes(base_size: int, patch_size: int, target_size: int) -> int:
    """What the worker may allocate: base + patch + target + diff + extra + bz2 buffers."""
    return _OVERHEAD_BYTES + base_size + 2 * patch_size + 3 * target_size


def apply(base_path: Path, patch: bytes | bytearray, target_size: int, *,
          max_memory_bytes: int | None = None, timeout_s: float = 600.0) -> bytes:
    """The patched bytes, produced by a child process; PatchRefused on any failure."""
    base_size = base_path.stat().st_size
    need = memory_budget_bytes(base_size, len(patch), target_size)
    cap = default_memory_cap_bytes() if max_memory_bytes is None else max_memory_bytes
    if need > cap:
        raise PatchRefused(f"patch needs about {need >> 20} MiB, over the {cap >> 20} MiB cap")
    argv = [sys.executable, "-I", str(WORKER), str(base_path), str(target_size),
            str(need)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    try:
        res = subprocess.run(argv, input=bytes(patch), capture_output=True, timeout=timeout_s,
                             env=env, check=False)
    except subprocess.TimeoutExpired as e:
        raise PatchRefused(f"bspatch did not finish within {timeout_s:.0f} s") from e
    except OSError as e:
        raise PatchRefused(f"cannot start bspatch: {e}") from e
    why = res.stderr.decode(errors="replace").strip().splitlines()
    detail = why[-1][:200] if why else ""
    if res.returncode == EXIT_NO_MEMORY or res.returncode == -9:
        raise PatchRefused(f"bspatch exceeded its {need >> 20} MiB memory cap {detail}".strip())
    if res.returncode != 0:
        raise PatchRefused(detail or f"bspatch exited with {res.returncode}")
    if len(res.stdout) != target_size:
        raise PatchRefused(f"bspatch produced {len(res.stdout)} bytes, not {target_size}")
    return res.stdout
