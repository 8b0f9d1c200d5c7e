"""The model-aware encoder: tensor-xor (container format: deltafleet.codecs.tensor_xor).

Pairing, per target tensor, first match wins:
1. a base tensor with exactly the same bytes (renamed or moved layers) -> ``copy``;
2. the base tensor with the same name, type and length;
3. the first unused base tensor with the same type and length (layers renamed by an insert).
Each paired tensor is cut into chunks of at most ``TX_CHUNK_BYTES``; a chunk equal to its base
is a ``copy``, otherwise the op (``xor``, ``sub``, ``zsub`` or ``raw``) that compresses a sample
of the chunk best is used for the whole chunk. ``zsub`` (zigzag of the signed difference) wins
on fine-tunes: every float moves a little, so the difference of the bit patterns is a small
signed integer whose high bytes are zero. Each byte plane is one zstd frame, or a bz2 stream
when the plane is sparse (a few changed INT8 weights) and bz2 packs it tighter, as it does
for bsdiff's own diff block. Unpaired tensors are ``raw`` (byte planes + zstd,
which beats zstd of the plain bytes on float data, so a complete retrain still gains a little).
Tensors under ``MIN_TENSOR_BYTES`` stay in the skeleton, where zstd against the base skeleton
handles them better than per-plane frames would.

Memory: both models are read chunk by chunk with pread; the payload goes to a temp file. Peak
is the skeletons plus a few chunks, whatever the model size.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard as zstd

from deltafleet.codecs import FileSource, Source
from deltafleet.codecs.tensor_xor import (
    BZ2_MAGIC,
    TX_CHUNK_BYTES,
    TX_MAGIC,
    TX_PREFIX,
    TX_VERSION,
    UINT_DTYPES,
    base_skeleton,
    pack_tx_header,
    planes_of,
    zigzag,
)

from .layout import TensorRange, model_tensors

MIN_TENSOR_BYTES = 1024
_SAMPLE_BLOCKS = 8
_SAMPLE_BLOCK_ELEMENTS = 4096
# bz2 is tried on a plane only when zstd already shrank it below this fraction: sparse planes,
# where bz2 wins by 10-20%; on dense planes it loses and costs ~10x zstd's time.
_BZ2_TRY_BELOW = 0.10


@dataclass(frozen=True, slots=True)
class TensorStats:
    tensors: int
    copied_bytes: int
    diffed_bytes: int
    raw_bytes: int
    skeleton_bytes: int


def _digest(src: Source, t: TensorRange) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for off in range(t.offset, t.offset + t.length, TX_CHUNK_BYTES):
        h.update(src.read_at(off, min(TX_CHUNK_BYTES, t.offset + t.length - off)))
    return h.digest()


def _pair(
    base_src: Source, base_t: list[TensorRange], target_src: Source, target_t: list[TensorRange]
) -> list[tuple[TensorRange, TensorRange | None, bool]]:
    """(target tensor, paired base tensor or None, identical?) for every target tensor."""
    by_digest: dict[bytes, TensorRange] = {}
    for t in base_t:
        by_digest.setdefault(_digest(base_src, t), t)
    by_name = {t.name: t for t in base_t}
    used: set[int] = set()
    out: list[tuple[TensorRange, TensorRange | None, bool]] = []
    pending: list[int] = []
    for t in target_t:
        same = by_digest.get(_digest(target_src, t))
        if same is not None and same.length == t.length:
            out.append((t, same, True))
            used.add(same.offset)
            continue
        named = by_name.get(t.name)
        if named is not None and named.length == t.length and named.dtype == t.dtype:
            out.append((t, named, False))
            used.add(named.offset)
            continue
        out.append((t, None, False))
        pending.append(len(out) - 1)
    for i in pending:
        t = out[i][0]
        for b in base_t:
            if b.offset not in used and b.length == t.length and b.dtype == t.dtype:
                out[i] = (t, b, False)
                used.add(b.offset)
                break
    return out


def _compress_plane(plane: np.ndarray, cctx: zstd.ZstdCompressor) -> bytes:
    frame = cctx.compress(plane.data)
    if len(frame) < _BZ2_TRY_BELOW * plane.nbytes:
        packed = bz2.compress(plane.data, 9)
        assert packed[:3] == BZ2_MAGIC
        if len(packed) < len(frame):
            return packed
    return frame


def _compress_planes(values: np.ndarray, cctx: zstd.ZstdCompressor) -> list[bytes]:
    return [_compress_plane(p, cctx) for p in planes_of(values)]


def _trial_size(values: np.ndarray, trial: zstd.ZstdCompressor) -> int:
    """What a sample costs with the fast zstd level, or with bz2 where a plane is sparse (so
    ``sub`` beats ``xor`` on INT8 weights moved by one step, as it does under bz2)."""
    return sum(len(_compress_plane(p, trial)) for p in planes_of(values))


def _sample(values: np.ndarray) -> np.ndarray:
    n = values.shape[0]
    if n <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK_ELEMENTS * 2:
        return values
    step = n // _SAMPLE_BLOCKS
    return np.concatenate(
        [values[i * step : i * step + _SAMPLE_BLOCK_ELEMENTS] for i in range(_SAMPLE_BLOCKS)]
    )


def _encode_chunk(
    new: np.ndarray, old: np.ndarray | None, cctx: zstd.ZstdCompressor, trial: zstd.ZstdCompressor
) -> tuple[str, list[bytes]]:
    candidates: dict[str, np.ndarray] = {"raw": new}
    if old is not None:
        candidates["xor"] = np.bitwise_xor(new, old)
        candidates["sub"] = np.subtract(new, old)
        candidates["zsub"] = zigzag(candidates["sub"])
    if len(candidates) > 1:
        sizes = {op: _trial_size(_sample(v), trial) for op, v in candidates.items()}
        best = min(sizes, key=lambda op: (sizes[op], op != "xor"))
    else:
        best = "raw"
    return best, _compress_planes(candidates[best], cctx)


def plane_level(target_size: int) -> int:
    """zstd level for the planes: as high as the 100 MB-in-15 s build target allows. Most
    plane bytes of a fine-tune are noise that every level stores as-is, so the cost is in
    the few compressible planes (25 MB FP32 fine-tune: level 6 0.25 s, 15 1.2 s (-1.3%),
    19 2.9 s (-1.7%))."""
    if target_size <= (32 << 20):
        return 19
    if target_size <= (256 << 20):
        return 15
    return 9


def _add_copy(segments: list[list[object]], t_off: int, n: int, b_off: int) -> None:
    """A copy segment, merged into the previous one when both are contiguous (an unchanged
    tensor is one segment, however large)."""
    if segments:
        last = segments[-1]
        if (last[2] == "copy" and last[0] + last[1] == t_off  # type: ignore[operator]
                and last[4] + last[1] == b_off):  # type: ignore[operator]
            last[1] += n  # type: ignore[operator]
            return
    segments.append([t_off, n, "copy", 1, b_off, []])


def encode_tensor_xor(
    base_path: Path, target_path: Path, out_path: Path, *, level: int | None = None
) -> TensorStats | None:
    """Write a tensor-xor delta to ``out_path``; None if either file is not a known model.
    ``level`` (zstd, planes) defaults to ``plane_level(target size)``."""
    with FileSource(base_path) as base, FileSource(target_path) as target:
        base_layout, target_layout = model_tensors(base), model_tensors(target)
        if base_layout is None or target_layout is None or base_layout[0] != target_layout[0]:
            return None
        base_t = [t for t in base_layout[1] if t.length >= MIN_TENSOR_BYTES]
        target_t = [t for t in target_layout[1] if t.length >= MIN_TENSOR_BYTES]
        pairs = _pair(base, base_t, target, target_t)

        level = plane_level(target.size) if level is None else level
        cctx = zstd.ZstdCompressor(level=level)
        trial = zstd.ZstdCompressor(level=1)
        segments: list[list[object]] = []
        skeleton_parts: list[bytes | memoryview] = []
        copied = diffed = raw = 0
        pos = 0
        fd, payload_tmp = tempfile.mkstemp(dir=out_path.parent, prefix=".tx-payload.")
        try:
            with os.fdopen(fd, "wb") as payload:
                for t, b, identical in pairs:
                    skeleton_parts.append(target.read_at(pos, t.offset - pos))
                    pos = t.offset + t.length
                    step = TX_CHUNK_BYTES - TX_CHUNK_BYTES % t.itemsize
                    for rel in range(0, t.length, step):
                        n = min(step, t.length - rel)
                        b_off = b.offset + rel if b is not None else 0
                        if identical:
                            _add_copy(segments, t.offset + rel, n, b_off)
                            copied += n
                            continue
                        new_bytes = target.read_at(t.offset + rel, n)
                        old_bytes = base.read_at(b_off, n) if b is not None else None
                        if old_bytes is not None and old_bytes == new_bytes:
                            _add_copy(segments, t.offset + rel, n, b_off)
                            copied += n
                            continue
                        width = t.itemsize if n % t.itemsize == 0 else 1
                        dtype = UINT_DTYPES[width]
                        new = np.frombuffer(new_bytes, dtype=dtype)
                        old = np.frombuffer(old_bytes, dtype=dtype) if old_bytes else None
                        op, frames = _encode_chunk(new, old, cctx, trial)
                        for f in frames:
                            payload.write(f)
                        segments.append(
                            [t.offset + rel, n, op, width, b_off, [len(f) for f in frames]]
                        )
                        if op == "raw":
                            raw += n
                        else:
                            diffed += n
                skeleton_parts.append(target.read_at(pos, target.size - pos))
            skeleton = b"".join(skeleton_parts)
            del skeleton_parts
            base_ranges = [[t.offset, t.length] for t in base_t]
            dictionary = zstd.ZstdCompressionDict(
                base_skeleton(base, base_ranges), dict_type=zstd.DICT_TYPE_RAWCONTENT
            )
            skel_level = 19 if len(skeleton) < (8 << 20) else level
            params = zstd.ZstdCompressionParameters.from_level(
                skel_level,
                window_log=max(20, min(31, (len(skeleton) + len(dictionary.as_bytes())).bit_length())),
            )
            skel_frame = zstd.ZstdCompressor(
                dict_data=dictionary, compression_params=params
            ).compress(skeleton)
            header = {
                "target_size": target.size,
                "base_size": base.size,
                "chunk_bytes": TX_CHUNK_BYTES,
                "base_ranges": base_ranges,
                "skeleton": [0, len(skel_frame), len(skeleton)],
                "segments": segments,
            }
            packed = zstd.ZstdCompressor(level=19).compress(
                json.dumps(pack_tx_header(header), separators=(",", ":")).encode()
            )
            with open(out_path, "wb") as out, open(payload_tmp, "rb") as payload_in:
                out.write(TX_PREFIX.pack(TX_MAGIC, TX_VERSION, len(packed)))
                out.write(packed)
                out.write(skel_frame)
                shutil.copyfileobj(payload_in, out, 1 << 20)
        finally:
            os.unlink(payload_tmp)
        return TensorStats(len(target_t), copied, diffed, raw, len(skeleton))
