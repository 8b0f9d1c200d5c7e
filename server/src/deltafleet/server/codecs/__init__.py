"""Delta encoders behind one interface, and the rule that picks the one to ship.

Every encoder predicts its peak memory and time from the file sizes *before* it runs; the
chooser skips any whose prediction exceeds the budget, runs the rest (cheapest first), and
keeps the smallest output whose round trip (decode with the shared decoder, streamed, ==
target sha256) checks out. A result that is not smaller than the full artifact (what a full
install ships: the zstd-compressed target, or the target itself when compression does not
help) is no delta at all: ``choose`` then returns no winner and the full model is shipped.

Full models ship compressed: ``compress_full`` is the one place a full model is compressed
(one zstd frame, the agent's ``zstd`` codec), both for the shipped artifact
(``build_compressed_full``, run when a model is registered) and for the size a delta must beat.

Decoders live in ``deltafleet.codecs`` (a part of deltafleet-shared) so devices need neither onnx
nor server code, and the server no code of the agent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bsdiff4
import zstandard as zstd

from deltafleet.codecs import (
    BSDIFF4,
    TENSOR_XOR,
    ZSTD,
    ZSTD_DICT,
    CodecError,
    FileSource,
    decode_sha256,
)
from deltafleet.shared import sha256_file

from ..errors import EncodeFailed
from ..planner import FullArtifact, full_artifact
from .layout import model_tensors
from .tensor import encode_tensor_xor, plane_level

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30
DEFAULT_TIME_BUDGET_S = 60.0
_OVERHEAD_BYTES = 96 << 20  # interpreter + numpy + onnx-free server imports in a worker


@dataclass(frozen=True)
class Budget:
    """Limits for building one delta. A codec predicted to exceed either is not run."""

    memory_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    time_s: float = DEFAULT_TIME_BUDGET_S


class Encoder(ABC):
    name: str

    @abstractmethod
    def predicted_peak_bytes(self, base_size: int, target_size: int) -> int: ...

    @abstractmethod
    def predicted_seconds(self, base_size: int, target_size: int) -> float: ...

    def applicable(self, base_path: Path, target_path: Path) -> bool:
        return True

    @abstractmethod
    def encode(self, base_path: Path, target_path: Path, out_path: Path) -> None: ...


class Bsdiff4Encoder(Encoder):
    """The baseline. Suffix sorting costs ~17x the base in memory and ~1 s per MB on one core."""

    name = BSDIFF4

    def predicted_peak_bytes(self, base_size: int, target_size: int) -> int:
        return _OVERHEAD_BYTES + 17 * base_size + 2 * target_size

    def predicted_seconds(self, base_size: int, target_size: int) -> float:
        return 1.2 * (base_size + target_size) / 2 / 1e6

    def encode(self, base_path: Path, target_path: Path, out_path: Path) -> None:
        out_path.write_bytes(bsdiff4.diff(base_path.read_bytes(), target_path.read_bytes()))


class ZstdDictEncoder(Encoder):
    """zstd with the base as a raw-content dictionary and long-distance matching
    (``zstd --patch-from``): finds moved and unchanged byte runs anywhere in the base."""

    name = ZSTD_DICT

    def __init__(self, level: int = 6) -> None:
        self.level = level

    def predicted_peak_bytes(self, base_size: int, target_size: int) -> int:
        # base read + dictionary copy + target read + output, plus zstd tables for the window.
        return _OVERHEAD_BYTES + 2 * base_size + 2 * target_size + (base_size + target_size) // 2

    def predicted_seconds(self, base_size: int, target_size: int) -> float:
        return (base_size + target_size) / 100e6

    def encode(self, base_path: Path, target_path: Path, out_path: Path) -> None:
        base = base_path.read_bytes()
        target = target_path.read_bytes()
        window_log = max(20, min(31, (len(base) + len(target)).bit_length()))
        try:
            out_path.write_bytes(_patch_from(base, target, self.level, window_log))
            return
        except ImportError:  # no cffi backend: the dictionary path, weak on large bases
            pass
        params = zstd.ZstdCompressionParameters.from_level(
            self.level, window_log=window_log, enable_ldm=True, source_size=len(target)
        )
        dictionary = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
        del base
        out_path.write_bytes(
            zstd.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(target)
        )


def _patch_from(base: bytes, target: bytes, level: int, window_log: int) -> bytes:
    """``zstd --patch-from``: the base referenced as a *prefix* (``ZSTD_CCtx_refPrefix``),
    with long-distance matching over base and target. python-zstandard only offers
    dictionaries, which zstd loads as a CDict: it then indexes just the last 2^(hashLog+3)
    bytes of the base (4 MiB at level 6) and long-distance matching ignores it, so a 25 MB
    graph-only change came out at 92% of the model (with a prefix: 3 KB). The frame decodes
    with the base as a raw-content dictionary, as the agent does. ImportError without the
    binding's cffi backend."""
    from zstandard import backend_cffi  # noqa: PLC0415 - optional: needs cffi

    lib, ffi = backend_cffi.lib, backend_cffi.ffi

    def check(code: int) -> int:
        if lib.ZSTD_isError(code):
            raise EncodeFailed(f"zstd: {ffi.string(lib.ZSTD_getErrorName(code)).decode()}")
        return code

    cctx = lib.ZSTD_createCCtx()
    if cctx == ffi.NULL:
        raise EncodeFailed("zstd: cannot create a compression context")
    try:
        for param, value in ((lib.ZSTD_c_compressionLevel, level),
                             (lib.ZSTD_c_windowLog, window_log),
                             (lib.ZSTD_c_enableLongDistanceMatching, 1),
                             (lib.ZSTD_c_checksumFlag, 1)):
            check(lib.ZSTD_CCtx_setParameter(cctx, param, value))
        check(lib.ZSTD_CCtx_setPledgedSrcSize(cctx, len(target)))
        prefix = ffi.from_buffer(base)
        check(lib.ZSTD_CCtx_refPrefix(cctx, prefix, len(base)))
        capacity = lib.ZSTD_compressBound(len(target))
        out = ffi.new("char[]", capacity)
        n = check(lib.ZSTD_compress2(cctx, out, capacity, ffi.from_buffer(target), len(target)))
        return bytes(ffi.buffer(out, n))
    finally:
        lib.ZSTD_freeCCtx(cctx)


class TensorXorEncoder(Encoder):
    """Model-aware: see ``tensor.py``. Streams both models; memory does not grow with size."""

    name = TENSOR_XOR

    def __init__(self, level: int | None = None) -> None:
        self.level = level  # None: tensor.plane_level(target size)

    def predicted_peak_bytes(self, base_size: int, target_size: int) -> int:
        # Skeletons are a few MB for real models; chunks are 4 MiB.
        return _OVERHEAD_BYTES + (64 << 20) + (base_size + target_size) // 64

    def predicted_seconds(self, base_size: int, target_size: int) -> float:
        level = self.level if self.level is not None else plane_level(target_size)
        rate = 15e6 if level >= 19 else 40e6 if level >= 12 else 100e6  # bytes of both, per s
        return (base_size + target_size) / rate

    def applicable(self, base_path: Path, target_path: Path) -> bool:
        with FileSource(base_path) as b, FileSource(target_path) as t:
            lb, lt = model_tensors(b), model_tensors(t)
        return lb is not None and lt is not None and lb[0] == lt[0]

    def encode(self, base_path: Path, target_path: Path, out_path: Path) -> None:
        if encode_tensor_xor(base_path, target_path, out_path, level=self.level) is None:
            raise EncodeFailed("not a pair of ONNX or TFLite models")


def default_encoders() -> list[Encoder]:
    """Cheapest first, so a slow baseline never delays a good fast result."""
    return [TensorXorEncoder(), ZstdDictEncoder(), Bsdiff4Encoder()]


@dataclass
class Attempt:
    codec: str
    size_bytes: int | None = None
    seconds: float = 0.0
    verified: bool = False
    skipped: str = ""  # why it did not run or was rejected


@dataclass
class Choice:
    """The winner (None: ship the full model) and what every codec did."""

    codec: str | None
    path: Path | None
    size_bytes: int | None
    reference_bytes: int  # the full artifact (compressed target) a delta has to beat
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def reason(self) -> str:
        ran = ", ".join(
            f"{a.codec}={a.size_bytes}" if a.size_bytes is not None else f"{a.codec}: {a.skipped}"
            for a in self.attempts
        )
        return f"no delta smaller than the compressed full model ({self.reference_bytes}); {ran}"


FULL_LEVEL_SWITCH_BYTES = 32 << 20


def full_level(size_bytes: int) -> int:
    """zstd level for a full model: 19 up to 32 MiB, 3 above (on model weights level 3 is
    within ~1% of 19 and 60x faster)."""
    return 19 if size_bytes <= FULL_LEVEL_SWITCH_BYTES else 3


def compress_full(model_path: Path, sink: Callable[[bytes], object],
                  level: int | None = None) -> int:
    """Stream ``model_path`` into ``sink`` as one zstd frame (the agent's ``zstd`` codec) and
    return its size. The one place a full model is compressed: the artifact a full install
    ships and the size a delta has to beat come from here. Reads 1 MiB at a time; the frame
    records the content size, and its window (at most 8 MiB at these levels) is far below the
    agent's ``ZSTD_MAX_WINDOW_BYTES``."""
    size = model_path.stat().st_size
    cctx = zstd.ZstdCompressor(level=full_level(size) if level is None else level, threads=-1)
    total = 0
    with open(model_path, "rb") as f:
        for piece in cctx.read_to_iter(f, size=size, read_size=1 << 20, write_size=1 << 20):
            total += len(piece)
            sink(piece)
    return total


def compressed_full_size(target_path: Path, level: int | None = None) -> int:
    """Size of the zstd-compressed target (``compress_full``), nothing written."""
    return compress_full(target_path, lambda piece: None, level)


def full_artifact_size(target_path: Path) -> int:
    """What a full install of the target ships: its compressed size, or its own size when
    compression does not make it smaller (it then ships as it is): ``planner.full_artifact``."""
    packed = FullArtifact(ZSTD, "", compressed_full_size(target_path))
    return full_artifact("", target_path.stat().st_size, packed).size_bytes


@dataclass(frozen=True)
class CompressedFull:
    """A verified compressed form of a model, in a temp file the caller stores and deletes."""

    path: Path
    sha256: str
    size_bytes: int
    level: int
    codec: str = ZSTD


def build_compressed_full(model_path: Path, out_dir: Path, *,
                          model_sha256: str | None = None) -> CompressedFull | None:
    """Compress ``model_path`` into a temp file in ``out_dir`` and decode it again with the
    agent's decoder (streamed): the result must reproduce the model's sha256 and size.

    None, leaving nothing behind, when the frame is not smaller than the model (the model
    then ships as it is) or does not round-trip (logged: a compressor bug must not reach a
    device; the model ships as it is)."""
    model_size = model_path.stat().st_size
    model_sha256 = model_sha256 or sha256_file(model_path)
    level = full_level(model_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".compress.", suffix=".tmp")
    path = Path(tmp)
    keep = False
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:

            def sink(piece: bytes) -> None:
                h.update(piece)
                out.write(piece)

            size = compress_full(model_path, sink, level)
        if size >= model_size:
            log.info("zstd does not shrink %s (%d -> %d bytes); it ships as it is",
                     model_path.name, model_size, size)
            return None
        try:
            sha, out_size = decode_sha256(ZSTD, path, None)
        except CodecError as e:
            sha, out_size = f"error: {e}", -1
        if (sha, out_size) != (model_sha256, model_size):
            log.error("compressed %s does not round-trip (%s); it ships as it is",
                      model_path.name, sha[:40])
            return None
        keep = True
        return CompressedFull(path, h.hexdigest(), size, level)
    finally:
        if not keep:
            path.unlink(missing_ok=True)


def choose(
    base_path: Path,
    target_path: Path,
    out_dir: Path,
    *,
    budget: Budget | None = None,
    encoders: list[Encoder] | None = None,
    target_sha256: str | None = None,
    reference_bytes: int | None = None,
) -> Choice:
    """Run every encoder that fits the budget; keep the smallest verified delta.

    ``reference_bytes``: the full artifact a delta must beat, when the caller knows it (the
    catalog records it when a model is registered); computed (``full_artifact_size``) if not.
    Losers' files are deleted; the winner's file is left in ``out_dir`` for the caller.
    """
    budget = budget or Budget()
    encoders = default_encoders() if encoders is None else encoders
    base_size, target_size = base_path.stat().st_size, target_path.stat().st_size
    target_sha256 = target_sha256 or sha256_file(target_path)
    reference = full_artifact_size(target_path) if reference_bytes is None else reference_bytes
    attempts: list[Attempt] = []
    results: list[tuple[int, str, Path]] = []
    for enc in encoders:
        attempt = Attempt(enc.name)
        attempts.append(attempt)
        need = enc.predicted_peak_bytes(base_size, target_size)
        if need > budget.memory_bytes:
            attempt.skipped = (
                f"predicted {need >> 20} MiB over the {budget.memory_bytes >> 20} MiB budget"
            )
            continue
        secs = enc.predicted_seconds(base_size, target_size)
        if secs > budget.time_s:
            attempt.skipped = f"predicted {secs:.0f} s over the {budget.time_s:.0f} s budget"
            continue
        if not enc.applicable(base_path, target_path):
            attempt.skipped = "not applicable to these files"
            continue
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".delta.{enc.name}.", suffix=".tmp")
        os.close(fd)
        t0 = time.perf_counter()
        try:
            enc.encode(base_path, target_path, Path(tmp))
        except (CodecError, ValueError, MemoryError, zstd.ZstdError) as e:
            Path(tmp).unlink(missing_ok=True)
            attempt.skipped = f"failed: {e}"
            log.warning("%s encode failed: %s", enc.name, e)
            continue
        attempt.seconds = time.perf_counter() - t0
        attempt.size_bytes = os.path.getsize(tmp)
        results.append((attempt.size_bytes, enc.name, Path(tmp)))

    results.sort()
    winner: tuple[int, str, Path] | None = None
    for size, name, path in results:
        attempt = next(a for a in attempts if a.codec == name)
        if winner is not None or size >= reference:
            if size >= reference:
                attempt.skipped = "not smaller than the compressed full model"
            path.unlink(missing_ok=True)
            continue
        try:
            sha, out_size = decode_sha256(name, path, base_path)
        except (CodecError, MemoryError) as e:
            sha, out_size = f"error: {e}", -1
        if sha == target_sha256 and out_size == target_size:
            attempt.verified = True
            winner = (size, name, path)
        else:
            attempt.skipped = "round trip did not reproduce the target"
            log.error("%s delta does not round-trip (%s); discarded", name, sha[:40])
            path.unlink(missing_ok=True)
    if winner is None:
        return Choice(None, None, None, reference, attempts)
    return Choice(winner[1], winner[2], winner[0], reference, attempts)


__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "DEFAULT_TIME_BUDGET_S",
    "Attempt",
    "Bsdiff4Encoder",
    "Budget",
    "Choice",
    "CompressedFull",
    "Encoder",
    "TensorXorEncoder",
    "ZstdDictEncoder",
    "build_compressed_full",
    "choose",
    "compress_full",
    "compressed_full_size",
    "default_encoders",
    "full_artifact_size",
    "full_level",
]
