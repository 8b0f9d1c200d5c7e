"""Decode any codec's artifact in a contained child process: memory-capped, time-limited.

Every decoder (``bsdiff4``, ``zstd``, ``zstd-dict``, ``tensor-xor``; ``identity`` too, it is
cheap) runs in ``_decode_worker`` as a separate interpreter, never in the agent:

- the parent refuses what is predicted (from file sizes) to exceed the cap before it starts;
- the child caps its own address space to the device's cap (``patch_memory_bytes``, default
  half the RAM), its CPU time, and the size of the file it may write, dies with its parent
  and is the OOM killer's first choice; inside, every header field is bounded before it is
  allocated (``codecs.check_tx_header``, ``codecs.check_zstd_frame``);
- the parent kills it after ``timeout_s`` (``patch_timeout_s``) of wall-clock time;
- the parent hashes the output itself and renames it to ``dest`` (after fsync) only when it
  has the signed size and sha256. Nothing is left behind on failure.

A refusal raises a ``codecs.CodecError``: ``MemoryCapExceeded`` (over the cap, predicted or
hit), ``DecodeTimeout``, ``TargetMismatch``, or ``DecodeRefused`` with the child's one-line
reason. The child's start costs an interpreter and the numpy import (~0.3 s, ~50 MB) per
update, not per byte (see docs/deltas.md for the measured figures); it runs at nice
``DECODE_NICE`` so that start and the patching yield the CPU to the model being served.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from deltafleet.codecs import (
    FULL_CODECS,
    STREAM_PIECE_BYTES,
    ChunkSource,
    CodecError,
    FileSource,
    MemoryCapExceeded,
    Source,
    check_memory,
    memory_cap_bytes,
)
from deltafleet.shared import StagedMismatch, staged_file

from . import _decode_worker as worker
from .codecs import staged_mismatch

log = logging.getLogger(__name__)
WORKER_MODULE = "deltafleet.agent._decode_worker"
DECODE_NICE = 10  # the child runs at low priority: inference on the device comes first


class DecodeRefused(CodecError):
    """The contained decoder refused the artifact (malformed, lying header, crashed)."""


class DecodeEnvironmentError(CodecError):
    """The decode could not run or finish for a reason of this device (no base on disk, no
    process, a full disk): not the artifact's fault, so it may be tried again later."""


class DecodeTimeout(CodecError):
    """The contained decoder did not finish within its time limit and was killed."""


@dataclass(frozen=True, slots=True)
class Decoded:
    sha256: str
    child_peak_rss_bytes: int  # the decoder process's own peak (VmHWM)
    seconds: float


def _artifact_spec(artifact: Source, scratch_dir: Path) -> tuple[dict, Path | None]:
    """How the child opens the artifact; an in-memory one is spooled to a temp file first."""
    if isinstance(artifact, ChunkSource):
        return {"chunks": str(artifact.dir), "count": artifact.count,
                "chunk_size": artifact.chunk_size, "size": artifact.size}, None
    if isinstance(artifact, FileSource):
        return {"file": str(artifact.path)}, None
    fd, spool = tempfile.mkstemp(dir=scratch_dir, prefix=".artifact.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        for off in range(0, artifact.size, STREAM_PIECE_BYTES):
            f.write(artifact.read_at(off, min(STREAM_PIECE_BYTES, artifact.size - off)))
    return {"file": spool}, Path(spool)


def decode_confined(codec: str, artifact: Source, base_path: Path | None, dest: Path, *,
                    target_size: int, expect_sha256: str | None = None,
                    max_memory_bytes: int | None = None,
                    timeout_s: float = 600.0) -> Decoded:
    """Decode ``artifact`` into ``dest`` in a contained child (see the module docstring)."""
    base_size = 0
    if codec not in FULL_CODECS:
        if base_path is None or not Path(base_path).is_file():
            raise DecodeEnvironmentError("delta needs the base model, which is not on disk")
        base_size = Path(base_path).stat().st_size
    cap = memory_cap_bytes(max_memory_bytes)
    check_memory(codec, base_size, target_size, artifact.size, cap)
    dest = Path(dest)
    spool: Path | None = None
    started = time.monotonic()
    try:
        with staged_file(dest, expect_size=target_size, expect_sha256=expect_sha256) as out:
            spec, spool = _artifact_spec(artifact, dest.parent)
            peak = _run_child(codec, spec, base_path, out.path, target_size, cap, timeout_s,
                              artifact.size)
            out.rehash()
    except StagedMismatch as e:
        raise staged_mismatch(
            e, DecodeRefused(f"decoder produced {out.size} bytes, not {target_size}")) from e
    finally:
        if spool is not None:
            spool.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    log.info("decoded %s: %d bytes in %.2f s, child peak %d MiB", codec, target_size, seconds,
             peak >> 20)
    return Decoded(out.sha256, peak, seconds)


def _run_child(codec: str, spec: dict, base_path: Path | None, out: Path, target_size: int,
               cap: int, timeout_s: float, artifact_size: int) -> int:
    """Run the contained decoder into ``out``; its peak memory, or the refusal it ended in."""
    argv = [sys.executable, "-I", "-m", WORKER_MODULE, json.dumps({
        "codec": codec, "artifact": spec, "base": str(base_path) if base_path else None,
        "out": str(out), "target_size": target_size, "budget_bytes": cap,
        "timeout_s": timeout_s, "parent_pid": os.getpid()})]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log.info("decoding a %s artifact of %d bytes in a child (cap %d MiB, %.0f s)", codec,
             artifact_size, cap >> 20, timeout_s)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
    except OSError as e:
        raise DecodeEnvironmentError(f"cannot start the decoder: {e}") from e
    with contextlib.suppress(OSError):  # its start and its patching yield to the serving
        os.setpriority(os.PRIO_PROCESS, proc.pid, DECODE_NICE)
    try:
        stdout, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.communicate()
        raise DecodeTimeout(f"decoder did not finish within {timeout_s:g} s "
                            "(killed)") from e
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    rc = proc.returncode
    lines = err.decode(errors="replace").strip().splitlines()
    detail = lines[-1][:300] if lines else ""
    if rc == worker.EXIT_NO_MEMORY:
        raise MemoryCapExceeded(f"{detail or 'over the memory cap'} "
                                f"(cap {cap >> 20} MiB)")
    if rc == worker.EXIT_ENVIRONMENT:
        raise DecodeEnvironmentError(detail or "decoder hit an I/O error")
    if rc in (-signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP):  # a service stop
        raise DecodeEnvironmentError(f"decoder was stopped by signal {-rc}")
    if rc in (-9, -24):  # SIGKILL (the OOM killer), SIGXCPU (its CPU-time backstop)
        raise DecodeTimeout(f"decoder was killed by signal {-rc} (memory or CPU limit)")
    if rc != 0:
        raise DecodeRefused(detail or f"decoder exited with {rc}")
    fields = stdout.decode(errors="replace").split()
    return int(fields[2]) if len(fields) == 3 and fields[0] == "ok" else 0


__all__ = ["DecodeEnvironmentError", "DecodeRefused", "DecodeTimeout", "Decoded",
           "decode_confined"]
