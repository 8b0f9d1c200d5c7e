"""The tensor-xor container format: one reviewed home for what encoder and decoder share.

A model-aware container: the server builds it from the ONNX/TFLite structure
(``deltafleet.server.codecs.tensor``), a decoder applies it on raw bytes
(``deltafleet.codecs.decoders``). Layout, all integers little-endian::

    b"DFTX" | u8 version (2) | u32 header length | header | payload

The header is a zstd-compressed JSON object, offsets stored as gaps so that it stays a few
hundred bytes for a graph-only change::

    {"target_size": int, "base_size": int, "chunk_bytes": int,
     "base_ranges": [[gap, length], ...],   # tensor bytes of the base, in order; gap from
                                            # the end of the previous range (or 0)
     "skeleton": [payload_offset, payload_length, raw_length],
     "segments": [[gap, length, op, itemsize, base_range, base_rel, [plane lengths]], ...]}

A segment starts ``gap`` bytes after the end of the previous one (or 0); its base bytes are
at ``base_ranges[base_range]`` + ``base_rel`` (``base_range`` -1: none, for ``raw``).
``unpack_tx_header`` turns this into absolute ``[target_offset, length, op, itemsize,
base_offset, planes]`` rows.

``segments`` cover tensor bytes of the target, in target order and non-overlapping. Their
payload frames follow one another in the payload, in segment order. ``op`` is one of
``copy`` (base bytes as they are, no payload, any length: decoded in ``chunk_bytes``
pieces), ``raw`` (the target's elements split into
``itemsize`` byte planes, each plane one compressed frame), ``xor`` / ``sub`` (the same for
``target ^ base`` / ``target - base`` taken as unsigned ``itemsize``-byte integers), ``zsub``
(``target - base`` as a signed integer, zigzag-mapped so that small differences of either
sign have zero high bytes: ``(d << 1) ^ (d >> (8 * itemsize - 1))``). A plane frame is a zstd
frame, or a bz2 stream (``BZh`` magic) where bz2 packs a sparse plane tighter.
Every target byte no segment covers comes, in order, from the *skeleton*: one zstd frame
compressed with the base's skeleton (the base minus ``base_ranges``) as a raw-content
dictionary, so graph structure is diffed against the old graph.

Decoding streams: base and delta are read range by range and the target is written
segment by segment, so the peak is the skeleton plus one chunk, and a verifier can hash
the output without ever holding it.

``TX_VERSION`` is the version written; a reader accepts it and v1 (absolute offsets, deltas a
server built before v2). Every header field is bounded (``check_tx_header``) before anything
is allocated or read from it.
"""

from __future__ import annotations

import bz2
import json
import struct
from typing import Any

import numpy as np
import zstandard as zstd

from .errors import CodecError, MemoryCapExceeded, PatchMalformed
from .names import STREAM_PIECE_BYTES
from .source import Source

TX_MAGIC = b"DFTX"
TX_VERSION = 2
TX_PREFIX = struct.Struct("<4sBI")
MAX_HEADER_BYTES = 256 << 20
_HEADER_JSON_FLOOR_BYTES = 1 << 20
_OPS = ("copy", "raw", "xor", "sub", "zsub")
UINT_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")
}
INT_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.int8), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")
}
BZ2_MAGIC = b"BZh"

TX_CHUNK_BYTES = 4 << 20  # one segment never covers more than this many target bytes


def planes_of(elements: np.ndarray) -> list[np.ndarray]:
    """Split unsigned little-endian elements into byte planes (plane k = byte k of each)."""
    width = elements.dtype.itemsize
    as_bytes = elements.view(np.uint8).reshape(-1, width)
    return [np.ascontiguousarray(as_bytes[:, k]) for k in range(width)]


def header_json_limit(target_size: int, base_size: int) -> int:
    """The most header JSON a delta between models of these sizes may decompress to.

    The encoder writes one segment (under 80 bytes of JSON) per tensor of at least 1 KiB or
    per ``TX_CHUNK_BYTES`` of it, and one base range (under 30 bytes) per base tensor, so a
    genuine header stays below a tenth of the models; a 21 KB frame cannot ask for 256 MiB."""
    return min(MAX_HEADER_BYTES, _HEADER_JSON_FLOOR_BYTES + (target_size + base_size) // 8)


def read_tx_header(delta: Source, *, target_size: int | None = None,
                   base_size: int | None = None,
                   max_memory_bytes: int | None = None) -> tuple[dict, int]:
    """The parsed, checked header (absolute offsets) and the offset where the payload starts.

    Every field is bounded before anything is allocated from it (``check_tx_header``): the
    compressed header must fit the delta, its JSON ``header_json_limit`` (when the sizes are
    known), and the parse itself ``max_memory_bytes``. CodecError says which field lies."""
    if delta.size < TX_PREFIX.size:
        raise CodecError("tensor-xor delta is truncated")
    magic, version, header_len = TX_PREFIX.unpack(bytes(delta.read_at(0, TX_PREFIX.size)))
    if magic != TX_MAGIC or version not in (1, TX_VERSION):
        raise CodecError(f"not a tensor-xor v1/v{TX_VERSION} delta")
    if header_len > MAX_HEADER_BYTES or TX_PREFIX.size + header_len > delta.size:
        raise CodecError("tensor-xor header is truncated or too large")
    limit = MAX_HEADER_BYTES
    if target_size is not None and base_size is not None:
        limit = header_json_limit(target_size, base_size)
    raw = _bounded_zstd(delta.read_at(TX_PREFIX.size, header_len), limit, "tensor-xor header")
    if max_memory_bytes is not None and _header_parse_bytes(len(raw)) > max_memory_bytes:
        raise MemoryCapExceeded(f"tensor-xor header of {len(raw)} JSON bytes needs about "
                                f"{_header_parse_bytes(len(raw)) >> 20} MiB to parse, over the "
                                f"{max_memory_bytes >> 20} MiB cap")
    try:
        packed = json.loads(raw)
        del raw
        if not isinstance(packed, dict):
            raise PatchMalformed("not an object")
        # v1 (deltas a server built before v2) stored absolute offsets
        header = unpack_tx_header(packed) if version == TX_VERSION else packed
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
        raise CodecError(f"tensor-xor header is corrupt: {str(e)[:120]}") from e
    payload_start = TX_PREFIX.size + header_len
    check_tx_header(header, delta.size - payload_start,
                    target_size=target_size, base_size=base_size)
    return header, payload_start


def _bounded_zstd(frame: bytes | memoryview, limit: int, what: str) -> bytes:
    """A zstd frame decompressed to at most ``limit`` bytes, whatever size it declares."""
    try:
        declared = zstd.get_frame_parameters(frame).content_size
    except zstd.ZstdError as e:
        raise CodecError(f"{what} is corrupt: {e}") from e
    if declared != zstd.CONTENTSIZE_UNKNOWN and declared > limit:
        raise CodecError(f"{what} declares {declared} bytes, over its {limit}-byte bound")
    parts: list[bytes] = []
    got = 0
    try:  # piece by piece: nothing is allocated ahead of what the frame really produces
        with zstd.ZstdDecompressor().stream_reader(bytes(frame)) as reader:
            while piece := reader.read(min(STREAM_PIECE_BYTES, limit + 1 - got)):
                parts.append(piece)
                got += len(piece)
                if got > limit:
                    raise CodecError(f"{what} expands beyond its {limit}-byte bound")
    except zstd.ZstdError as e:
        raise CodecError(f"{what} is corrupt: {e}") from e
    return b"".join(parts)


def _header_parse_bytes(json_bytes: int) -> int:
    """Python objects for a JSON header of this size, parsed and unpacked (worst case: short
    lists and small numbers, ~16 bytes of objects per JSON byte, twice)."""
    return 32 * json_bytes


def _is_int(v: object) -> bool:
    return type(v) is int


def _ints(v: object, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(type(x) is int and x >= 0 for x in v)


def check_tx_header(header: dict[str, Any], payload_size: int, *,
                    target_size: int | None = None, base_size: int | None = None) -> None:
    """Every field of an absolute header (v1 as stored, v2 unpacked) within what the delta,
    the base and the signed target size allow, before any of it is allocated or read.
    CodecError names the first field that lies."""
    def bad(why: str) -> CodecError:
        return CodecError(f"tensor-xor header lies: {why}")

    for key in ("target_size", "base_size", "chunk_bytes"):
        if not _is_int(header.get(key)) or header[key] < 0:
            raise bad(f"{key} is not a size")
    t_size, b_size, chunk = header["target_size"], header["base_size"], header["chunk_bytes"]
    if target_size is not None and t_size != target_size:
        raise bad(f"target_size {t_size} is not the signed {target_size}")
    if base_size is not None and b_size != base_size:
        raise CodecError("delta was built for a different base (size differs)")
    if not 1 <= chunk <= TX_CHUNK_BYTES:
        raise bad(f"chunk_bytes {chunk} is outside 1..{TX_CHUNK_BYTES}")
    ranges, segments, skeleton = (header.get("base_ranges"), header.get("segments"),
                                  header.get("skeleton"))
    if not isinstance(ranges, list) or not isinstance(segments, list):
        raise bad("base_ranges and segments must be lists")
    end = 0
    for r in ranges:
        if not _ints(r, 2) or r[0] < end or r[0] + r[1] > b_size:
            raise bad("base ranges overlap, are unsorted or run past the base")
        end = r[0] + r[1]
    if not isinstance(skeleton, list) or not _ints(skeleton, 3):
        raise bad("skeleton is not [offset, length, raw length]")
    skel_off, skel_len, skel_raw = skeleton
    payload_end = skel_off + skel_len
    if payload_end > payload_size:
        raise bad("skeleton frame runs past the end of the delta")
    if len(segments) > max(t_size, 1):
        raise bad(f"{len(segments)} segments for a {t_size}-byte target")
    covered = pos = 0
    for seg in segments:
        if not isinstance(seg, list) or len(seg) != 6:
            raise bad("a segment is not [offset, length, op, itemsize, base offset, planes]")
        t_off, length, op, width, b_off, planes = seg
        if not (_is_int(t_off) and _is_int(length) and _is_int(width) and _is_int(b_off)):
            raise bad("a segment field is not an integer")
        if t_off < pos or length < 1 or t_off + length > t_size:
            raise bad(f"segment at {t_off}+{length} overlaps or runs past the target")
        if op not in _OPS or width not in UINT_DTYPES:
            raise bad(f"segment op {str(op)[:20]!r} / itemsize {width} is unknown")
        if op != "raw" and (b_off < 0 or b_off + length > b_size):
            raise bad(f"segment reads base bytes {b_off}+{length}, past the base")
        if op == "copy":
            if planes != []:
                raise bad("a copy segment has payload planes")
        else:
            if length > chunk or length % width:
                raise bad(f"segment of {length} bytes breaks chunk_bytes {chunk} / itemsize")
            if not isinstance(planes, list) or len(planes) != width or not all(
                    type(p) is int and p > 0 for p in planes):
                raise bad("segment planes do not match its itemsize")
            payload_end += sum(planes)
            if payload_end > payload_size:
                raise bad("payload planes run past the end of the delta")
        covered += length
        pos = t_off + length
    if covered + skel_raw != t_size:
        raise bad(f"segments ({covered} bytes) and skeleton ({skel_raw}) do not fill the "
                  f"{t_size}-byte target")


def pack_tx_header(header: dict[str, Any]) -> dict[str, Any]:
    """Absolute header (``base_ranges`` as [offset, length], segments as [target_offset,
    length, op, itemsize, base_offset, planes]) -> the stored form (gaps and range indexes)."""
    ranges = header["base_ranges"]
    starts = {off: i for i, (off, _) in enumerate(ranges)}
    stored_ranges, end = [], 0
    for off, length in ranges:
        stored_ranges.append([off - end, length])
        end = off + length
    segments, end, r = [], 0, 0
    for t_off, length, op, width, b_off, planes in header["segments"]:
        if op == "raw":
            index, rel = -1, 0
        else:  # ranges are sorted: find the one holding b_off, searching on from the last
            if not (ranges[r][0] <= b_off < ranges[r][0] + ranges[r][1]):
                r = starts.get(b_off, r)
                while not (ranges[r][0] <= b_off < ranges[r][0] + ranges[r][1]):
                    r = (r + 1) % len(ranges)
            index, rel = r, b_off - ranges[r][0]
        segments.append([t_off - end, length, op, width, index, rel, planes])
        end = t_off + length
    return {**header, "base_ranges": stored_ranges, "segments": segments}


def unpack_tx_header(packed: dict[str, Any]) -> dict[str, Any]:
    """The stored header -> absolute offsets (see ``pack_tx_header``); PatchMalformed (a
    ValueError) if malformed."""
    ranges, end = [], 0
    for gap, length in packed["base_ranges"]:
        if gap < 0 or length < 0:
            raise PatchMalformed("negative base range")
        ranges.append([end + gap, length])
        end = end + gap + length
    segments, end = [], 0
    for gap, length, op, width, index, rel, planes in packed["segments"]:
        if gap < 0 or length < 0 or rel < 0 or not -1 <= index < len(ranges):
            raise PatchMalformed("malformed segment")
        if index == -1:
            b_off = 0
        else:
            off, size = ranges[index]
            if rel + length > size:
                raise PatchMalformed("segment runs past its base range")
            b_off = off + rel
        segments.append([end + gap, length, op, width, b_off, planes])
        end = end + gap + length
    return {**packed, "base_ranges": ranges, "segments": segments}


def base_skeleton(base: Source, ranges: list[list[int]]) -> bytes:
    """The base without its tensor bytes: what the target skeleton is diffed against."""
    parts: list[bytes | memoryview] = []
    pos = 0
    for off, length in ranges:
        if off < pos:
            raise CodecError("base ranges overlap or are unsorted")
        parts.append(base.read_at(pos, off - pos))
        pos = off + length
    parts.append(base.read_at(pos, base.size - pos))
    return b"".join(parts)


def decompress_frame(data: bytes | memoryview, size: int, dctx: zstd.ZstdDecompressor) -> bytes:
    """One payload frame of exactly ``size`` bytes: zstd, or bz2 (bounded: no bombs).

    Nothing larger than ``size`` is ever allocated: a zstd frame that declares another content
    size is refused before it is decompressed (python-zstandard would allocate whatever the
    frame declares), and bz2 output stops one byte past ``size``."""
    if bytes(data[:3]) == BZ2_MAGIC:
        d = bz2.BZ2Decompressor()
        try:
            out = d.decompress(data, max_length=size + 1)
        except (OSError, EOFError, ValueError) as e:
            raise CodecError(f"corrupt payload frame: {e}") from e
        if len(out) != size or not d.eof:
            raise CodecError("payload frame has the wrong length")
        return out
    try:
        declared = zstd.get_frame_parameters(data).content_size
    except zstd.ZstdError as e:
        raise CodecError(f"corrupt payload frame: {e}") from e
    if declared != zstd.CONTENTSIZE_UNKNOWN and declared != size:
        raise CodecError(f"payload frame declares {declared} bytes, the header {size}")
    try:
        out = dctx.decompress(data, max_output_size=max(size, 1))
    except zstd.ZstdError as e:
        raise CodecError(f"corrupt payload frame: {e}") from e
    if len(out) != size:
        raise CodecError("payload frame has the wrong length")
    return out


def zigzag(diff: np.ndarray) -> np.ndarray:
    """Signed differences (as unsigned elements) -> zigzag: small magnitudes, small values."""
    bits = 8 * diff.dtype.itemsize
    signed = diff.view(INT_DTYPES[diff.dtype.itemsize])
    return ((signed << 1) ^ (signed >> (bits - 1))).view(diff.dtype)


def unzigzag(values: np.ndarray) -> np.ndarray:
    """Inverse of ``zigzag``, in place; returns the signed differences as unsigned elements."""
    low = values & 1
    values >>= 1
    np.negative(low, out=low)  # 0 -> 0, 1 -> all ones
    np.bitwise_xor(values, low, out=values)
    return values


__all__ = [
    "BZ2_MAGIC",
    "INT_DTYPES",
    "MAX_HEADER_BYTES",
    "TX_CHUNK_BYTES",
    "TX_MAGIC",
    "TX_PREFIX",
    "TX_VERSION",
    "UINT_DTYPES",
    "base_skeleton",
    "check_tx_header",
    "decompress_frame",
    "header_json_limit",
    "pack_tx_header",
    "planes_of",
    "read_tx_header",
    "unpack_tx_header",
    "unzigzag",
    "zigzag",
]
