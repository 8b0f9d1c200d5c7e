"""The contained decoder child: ``python -I -m deltafleet.agent._decode_worker SPEC``.

``SPEC`` is one JSON object (see ``confined.decode_confined``)::

    {"codec": str, "artifact": {"file": path} | {"chunks": dir, "count": n,
     "chunk_size": n, "size": n}, "base": path | null, "out": path, "target_size": n,
     "budget_bytes": n, "timeout_s": s, "parent_pid": pid}

Before it reads a byte of the artifact the child:

- dies with its parent (``PR_SET_PDEATHSIG``), so a killed agent leaves no decoder behind;
- offers itself to the kernel's OOM killer first (``oom_score_adj`` 1000);
- caps its address space (RLIMIT_AS) so that its resident memory stays within
  ``budget_bytes``, its CPU time (RLIMIT_CPU, a backstop to the parent's wall-clock kill) and
  the size of any file it writes (RLIMIT_FSIZE: the target, plus room for nothing else).

Then it decodes with ``deltafleet.codecs.decode_stream`` (the code the server round-trips with)
into ``out``, which the parent created, hashing on the way, and prints
``ok <sha256> <peak_rss_bytes>`` on stdout. Exit codes: 0 ok, 2 refused (one line on stderr
says why), 3 over the memory budget, 4 an I/O error of this device (a full disk: not the
artifact's fault).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import resource
import signal
import sys

EXIT_OK = 0
EXIT_REFUSED = 2
EXIT_NO_MEMORY = 3
EXIT_ENVIRONMENT = 4
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(EXIT_REFUSED)


def _oom_first() -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _limit(which: int, soft: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def _confine(budget_bytes: int, timeout_s: float, target_size: int) -> None:
    """Address space: what is mapped now plus what the budget leaves after the resident set
    (so resident memory stays within the budget); CPU: the wall-clock limit plus a margin."""
    vm_now = _status_bytes("VmSize") or (256 << 20)
    rss_now = _status_bytes("VmRSS")
    _limit(resource.RLIMIT_AS, vm_now + max(budget_bytes - rss_now, 16 << 20))
    _limit(resource.RLIMIT_CPU, math.ceil(timeout_s) + 5)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a silent death
    _limit(resource.RLIMIT_FSIZE, target_size + (1 << 20))


def main(spec: dict) -> int:
    _die_with_parent(int(spec["parent_pid"]))
    _oom_first()
    # before the cap: the decoders' numpy and zstd mappings are counted in
    from deltafleet.codecs import ChunkSource, CodecError, FileSource, decode_stream

    target_size = int(spec["target_size"])
    _confine(int(spec["budget_bytes"]), float(spec["timeout_s"]), target_size)
    art = spec["artifact"]
    if "file" in art:
        delta: FileSource | ChunkSource = FileSource(art["file"])
    else:
        delta = ChunkSource(art["chunks"], int(art["count"]), int(art["chunk_size"]),
                            int(art["size"]))
    base = FileSource(spec["base"]) if spec.get("base") else None
    h = hashlib.sha256()
    written = 0
    with open(spec["out"], "wb") as out:

        def sink(piece: bytes | memoryview) -> None:
            nonlocal written
            written += len(piece)
            if written > target_size:
                raise CodecError("decoded output is longer than the target")
            h.update(piece)
            out.write(piece)

        decode_stream(spec["codec"], delta, base, sink, target_size=target_size,
                      max_memory_bytes=int(spec["budget_bytes"]))
        if written != target_size:
            raise CodecError(f"decoded output has {written} bytes, not {target_size}")
        out.flush()
        os.fsync(out.fileno())
    print(f"ok {h.hexdigest()} {_status_bytes('VmHWM')}", flush=True)
    return EXIT_OK


def _run() -> int:
    try:
        spec = json.loads(sys.argv[1])
        return main(spec)
    except MemoryError:
        print("ran out of memory within its budget", file=sys.stderr)
        return EXIT_NO_MEMORY
    except OSError as e:
        if e.errno != errno.EFBIG:  # EFBIG: the output outgrew the target (RLIMIT_FSIZE)
            print(f"{type(e).__name__}: {e}"[:300], file=sys.stderr)
            return EXIT_ENVIRONMENT
        print(f"decoded output outgrew the target: {e}"[:300], file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # noqa: BLE001 - any failure is a refused artifact, said in one line
        if type(e).__name__ == "MemoryCapExceeded":
            print(str(e)[:300], file=sys.stderr)
            return EXIT_NO_MEMORY
        msg = str(e) if type(e).__name__ in ("CodecError", "TargetMismatch") else \
            f"{type(e).__name__}: {e}"
        print(msg.replace("\n", " ")[:300], file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(_run())
