"""bspatch in a child process: ``python -I _bspatch_worker.py BASE TARGET_SIZE BUDGET_BYTES``.

Reads the patch on stdin, writes the target on stdout. Caps its own address space before it
reads anything, bounds every bz2 block, and imports nothing of deltafleet (see ``bspatch``).
Exit codes: 0 ok, 2 malformed patch, 3 out of memory.
"""

import bz2
import os
import resource
import sys


def _address_space_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 256 << 20


def _cap_memory(budget: int) -> None:
    limit = _address_space_now() + budget
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _int64(raw: bytes) -> int:
    value = int.from_bytes(raw, "little") & ((1 << 63) - 1)
    return -value if raw[7] & 0x80 else value


def _bounded(data: bytes, limit: int, what: str) -> bytes:
    d = bz2.BZ2Decompressor()
    try:
        out = d.decompress(data, max_length=limit + 1)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{what} block is not valid bz2: {e}") from e
    if len(out) > limit:
        raise ValueError(f"{what} block expands beyond {limit} bytes (bz2 bomb)")
    if not d.eof:
        raise ValueError(f"{what} block is truncated")
    return out


def main() -> int:
    base_path, target_size, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _cap_memory(budget)
    import bsdiff4.core as core  # after the cap: the C extension lives under it too

    patch = sys.stdin.buffer.read()
    if len(patch) < 32 or patch[:8] != b"BSDIFF40":
        raise ValueError("not a BSDIFF40 patch")
    ctrl, diff, new = (_int64(patch[i:i + 8]) for i in (8, 16, 24))
    if min(ctrl, diff, new) < 0 or 32 + ctrl + diff > len(patch):
        raise ValueError("bad lengths in the patch header")
    if new != target_size:
        raise ValueError(f"patch declares {new} output bytes, expected {target_size}")
    bcontrol = _bounded(patch[32:32 + ctrl], 24 * (new + 1), "control")
    if len(bcontrol) % 24:
        raise ValueError("control block is not a list of triples")
    bdiff = _bounded(patch[32 + ctrl:32 + ctrl + diff], new, "diff")
    bextra = _bounded(patch[32 + ctrl + diff:], new, "extra")
    del patch
    with open(base_path, "rb") as f:
        base = f.read()
    out = core.patch(base, new, bcontrol, bdiff, bextra)
    if len(out) != target_size:
        raise ValueError(f"patch produced {len(out)} bytes, expected {target_size}")
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MemoryError:
        print("out of memory", file=sys.stderr)
        sys.exit(3)
    except Exception as e:  # noqa: BLE001 - any failure is a refused patch
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
