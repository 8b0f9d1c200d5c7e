"""Delta decoders: turn (base model, verified delta) into the target bytes within a memory cap.

Pure numpy / zstandard / bsdiff4, so the agent can apply every codec the server may choose
without onnx, protobuf or any server code. The server imports this module to round-trip every
delta it builds, so encoder and decoder can never drift apart.

Codecs (the manifest's ``artifact.codec``):

``identity``
    The artifact is the target (a full model, shipped as it is).
``zstd``
    A full model as one zstd frame (no base). Streams with a window of at most 128 MiB.
``bsdiff4``
    Classic bsdiff (BSDIFF40). Applied by ``bspatch`` in a memory-capped child process that
    streams: the base is read range by range and the target written as it is produced.
``zstd-dict``
    zstd frame compressed with the whole base as a raw-content dictionary and a window that
    covers it (the semantics of ``zstd --patch-from``). The decoder holds the dictionary (one
    copy of the base) and its window (up to the target size); the output streams.
``tensor-xor``
    Model-aware container (built by the server from the ONNX/TFLite structure, applied here on
    raw bytes). Layout, all integers little-endian::

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

Every decoder writes to a *sink* piece by piece (``decode_stream``): the agent writes the
pieces to a staging file while hashing them (``decode_to_file``), so no codec holds the
target in memory.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, cast

import numpy as np
import zstandard as zstd

from deltafleet.shared import fsync_dir

from ._bspatch_worker import stream_patch

IDENTITY = "identity"
ZSTD = "zstd"
BSDIFF4 = "bsdiff4"
ZSTD_DICT = "zstd-dict"
TENSOR_XOR = "tensor-xor"
CODECS = (IDENTITY, ZSTD, BSDIFF4, ZSTD_DICT, TENSOR_XOR)
FULL_CODECS = (IDENTITY, ZSTD)  # no base needed
ZSTD_MAX_WINDOW_BYTES = 1 << 27  # a full-model frame may not ask a device for more

TX_MAGIC = b"DFTX"
TX_VERSION = 2
TX_PREFIX = struct.Struct("<4sBI")
MAX_HEADER_BYTES = 256 << 20
_HEADER_JSON_FLOOR_BYTES = 1 << 20
_OPS = ("copy", "raw", "xor", "sub", "zsub")
_UINT: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")
}
_INT: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.int8), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")
}
BZ2_MAGIC = b"BZh"
STREAM_PIECE_BYTES = 1 << 20
# Interpreter, numpy and zstd contexts, counted once in every prediction.
_FIXED_OVERHEAD_BYTES = 64 << 20


class CodecError(ValueError):
    """The delta cannot be applied: malformed, wrong base, or over the memory cap."""


class UnknownCodec(CodecError):
    pass


class MemoryCapExceeded(CodecError):
    pass


class TargetMismatch(CodecError):
    """The decoded bytes are not the expected target (sha256 differs)."""


class Source(Protocol):
    size: int

    def read_at(self, offset: int, length: int) -> bytes | memoryview: ...


class BytesSource:
    """Random access to bytes already in memory (no copy)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self.size = len(self._view)

    def read_at(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CodecError(f"range {offset}+{length} is outside the data ({self.size} bytes)")
        return self._view[offset : offset + length]


class FileSource:
    """Random access to a file with pread: nothing but the range asked for is in memory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CodecError(f"range {offset}+{length} is outside the file ({self.size} bytes)")
        out = os.pread(self._fd, length, offset)
        while len(out) < length:  # pread may return short on some filesystems
            out += os.pread(self._fd, length - len(out), offset + len(out))
        return out

    def read_all(self) -> bytes:
        return self.read_at(0, self.size)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChunkSource:
    """Random access to an artifact stored as fixed-size chunk files ``0``, ``1``, ... (the
    agent's verified download; ``size`` is set once the whole artifact has been checked)."""

    def __init__(self, directory: Path, count: int, chunk_size: int, size: int = 0) -> None:
        self.dir = Path(directory)
        self.count = count
        self.chunk_size = chunk_size
        self.size = size

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CodecError(f"range {offset}+{length} is outside the artifact "
                             f"({self.size} bytes)")
        parts = []
        while length > 0:
            i, rel = divmod(offset, self.chunk_size)
            n = min(length, self.chunk_size - rel)
            with open(self.dir / str(i), "rb") as f:
                f.seek(rel)
                part = f.read(n)
            if len(part) != n:
                raise CodecError(f"chunk {i} changed on disk")
            parts.append(part)
            offset += n
            length -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)


class SourceReader:
    """A file-like ``read(n)`` over a Source, for stream decompressors."""

    def __init__(self, source: Source) -> None:
        self._src = source
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        left = self._src.size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        out = bytes(self._src.read_at(self._pos, n))
        self._pos += n
        return out


# ------------------------------------------------------------------ memory predictions


def predicted_decode_bytes(codec: str, base_size: int, target_size: int, delta_size: int) -> int:
    """Upper estimate of the decoder's peak memory when the output streams to a file
    (``decode_to_file``); ``decode`` adds the target it returns. bsdiff4's figure is its
    child process's (see ``bspatch``)."""
    if codec == IDENTITY:
        return _FIXED_OVERHEAD_BYTES + STREAM_PIECE_BYTES
    if codec == ZSTD:
        return _FIXED_OVERHEAD_BYTES + min(target_size, ZSTD_MAX_WINDOW_BYTES) + 2 * STREAM_PIECE_BYTES
    if codec == BSDIFF4:  # the patch is read from its chunk files, range by range
        return _FIXED_OVERHEAD_BYTES + 8 * STREAM_PIECE_BYTES
    if codec == ZSTD_DICT:
        # base read, then its dictionary copy (the read is freed), plus the window
        return _FIXED_OVERHEAD_BYTES + max(2 * base_size, base_size + target_size)
    if codec == TENSOR_XOR:
        # the least it can need; the decoder checks the header's own figures (skeleton sizes,
        # chunk_bytes: ``tx_decode_bytes``) against the cap before it allocates them
        return _FIXED_OVERHEAD_BYTES + 8 * TX_CHUNK_BYTES
    raise UnknownCodec(f"unknown codec {codec!r}")


TX_CHUNK_BYTES = 4 << 20  # one segment never covers more than this many target bytes


def _cap(max_memory_bytes: int | None) -> int:
    return default_memory_cap_bytes() if max_memory_bytes is None else max_memory_bytes


def default_memory_cap_bytes() -> int:
    """Half the machine's physical memory (a device also runs the model it serves)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):
        return 2 << 30


# ------------------------------------------------------------------ tensor-xor container


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
            raise ValueError("not an object")
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
        if op not in _OPS or width not in _UINT:
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


def tx_decode_bytes(header: dict[str, Any]) -> int:
    """Peak memory of ``_iter_tensor_xor`` for a checked header: the base skeleton (read,
    joined, and its dictionary), the target skeleton, and one chunk's arrays."""
    base_skel = header["base_size"] - sum(length for _, length in header["base_ranges"])
    return (_FIXED_OVERHEAD_BYTES + 3 * base_skel + header["skeleton"][2]
            + 6 * header["chunk_bytes"] + TX_CHUNK_BYTES)


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
    """The stored header -> absolute offsets (see ``pack_tx_header``); ValueError if malformed."""
    ranges, end = [], 0
    for gap, length in packed["base_ranges"]:
        if gap < 0 or length < 0:
            raise ValueError("negative base range")
        ranges.append([end + gap, length])
        end = end + gap + length
    segments, end = [], 0
    for gap, length, op, width, index, rel, planes in packed["segments"]:
        if gap < 0 or length < 0 or rel < 0 or not -1 <= index < len(ranges):
            raise ValueError("malformed segment")
        if index == -1:
            b_off = 0
        else:
            off, size = ranges[index]
            if rel + length > size:
                raise ValueError("segment runs past its base range")
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


def _decompress(data: bytes | memoryview, size: int, dctx: zstd.ZstdDecompressor) -> bytes:
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
    signed = diff.view(_INT[diff.dtype.itemsize])
    return ((signed << 1) ^ (signed >> (bits - 1))).view(diff.dtype)


def unzigzag(values: np.ndarray) -> np.ndarray:
    """Inverse of ``zigzag``, in place; returns the signed differences as unsigned elements."""
    low = values & 1
    values >>= 1
    np.negative(low, out=low)  # 0 -> 0, 1 -> all ones
    np.bitwise_xor(values, low, out=values)
    return values


def _iter_tensor_xor(delta: Source, base: Source, target_size: int | None = None,
                     max_memory_bytes: int | None = None) -> Iterator[bytes | memoryview]:
    header, payload_start = read_tx_header(delta, target_size=target_size, base_size=base.size,
                                           max_memory_bytes=max_memory_bytes)
    if max_memory_bytes is not None and tx_decode_bytes(header) > max_memory_bytes:
        raise MemoryCapExceeded(
            f"applying this tensor-xor delta needs about {tx_decode_bytes(header) >> 20} MiB "
            f"(skeletons of {header['skeleton'][2] >> 20} MiB), over the "
            f"{max_memory_bytes >> 20} MiB cap")
    dctx = zstd.ZstdDecompressor()
    skel_off, skel_len, skel_raw = header["skeleton"]
    skel_dict = zstd.ZstdCompressionDict(
        base_skeleton(base, header["base_ranges"]), dict_type=zstd.DICT_TYPE_RAWCONTENT
    )
    skel_frame = delta.read_at(payload_start + skel_off, skel_len)
    skeleton = memoryview(  # sliced without copies: the skeleton is held once
        _decompress(skel_frame, skel_raw, zstd.ZstdDecompressor(dict_data=skel_dict)))
    del skel_dict, skel_frame
    skel_pos = 0
    target_pos = 0
    payload_pos = payload_start + skel_off + skel_len
    for t_off, length, op, width, b_off, plane_lens in header["segments"]:
        gap = t_off - target_pos
        if gap:
            yield skeleton[skel_pos : skel_pos + gap]
            skel_pos += gap
        if op == "copy":
            for rel in range(0, length, TX_CHUNK_BYTES):
                yield base.read_at(b_off + rel, min(TX_CHUNK_BYTES, length - rel))
        else:
            n = length // width
            elements = np.empty((n, width), dtype=np.uint8)
            for k, plane_len in enumerate(plane_lens):
                frame = delta.read_at(payload_pos, plane_len)
                payload_pos += plane_len
                elements[:, k] = np.frombuffer(_decompress(frame, n, dctx), dtype=np.uint8)
            values = elements.reshape(-1).view(_UINT[width])
            if op in ("xor", "sub", "zsub"):
                old = np.frombuffer(base.read_at(b_off, length), dtype=_UINT[width])
                if op == "xor":
                    np.bitwise_xor(values, old, out=values)
                else:
                    if op == "zsub":
                        unzigzag(values)
                    np.add(values, old, out=values)
            yield values.view(np.uint8).data
        target_pos = t_off + length
    tail = header["target_size"] - target_pos
    if tail != skel_raw - skel_pos:
        raise CodecError("tensor-xor skeleton does not fill the target")
    if tail:
        yield skeleton[skel_pos:]


# ------------------------------------------------------------------ entry points


def _stream_zstd(dctx: zstd.ZstdDecompressor, delta: Source, sink: Callable[[bytes | memoryview], object],
                 target_size: int | None, codec: str) -> None:
    written = 0
    source = cast(IO[bytes], SourceReader(delta))  # read(n) is all the reader uses
    with dctx.stream_reader(source, read_size=STREAM_PIECE_BYTES) as reader:
        while chunk := reader.read(STREAM_PIECE_BYTES):
            written += len(chunk)
            if target_size is not None and written > target_size:
                raise CodecError(f"{codec} output is longer than the target")
            sink(chunk)


def zstd_window_bound(codec: str, base_size: int, target_size: int | None) -> int:
    """The largest window a ``zstd`` / ``zstd-dict`` frame may ask the decoder to allocate:
    128 MiB for a full model; for ``--patch-from`` the base plus the target, rounded up."""
    if codec == ZSTD:
        return ZSTD_MAX_WINDOW_BYTES
    if target_size is None:
        return 1 << 31
    return min(1 << 31, 1 << max(10, (base_size + target_size).bit_length()))


def check_zstd_frame(codec: str, delta: Source, base_size: int, target_size: int | None) -> None:
    """The frame header, before any decoding: its declared content size must be the signed
    target size and its window within ``zstd_window_bound`` (a window is allocated as the
    frame declares; with no content size declared it is the whole window)."""
    head = bytes(delta.read_at(0, min(delta.size, 18)))  # ZSTD_FRAMEHEADERSIZE_MAX
    try:
        params = zstd.get_frame_parameters(head)
    except zstd.ZstdError as e:
        raise CodecError(f"{codec} frame header is corrupt or truncated: {e}") from e
    declared = params.content_size
    if target_size is not None and declared not in (zstd.CONTENTSIZE_UNKNOWN, target_size):
        raise CodecError(f"{codec} frame declares {declared} output bytes, the manifest "
                         f"{target_size}")
    bound = zstd_window_bound(codec, base_size, target_size)
    if params.window_size > bound and declared == zstd.CONTENTSIZE_UNKNOWN:
        raise CodecError(f"{codec} frame asks for a {params.window_size}-byte window and "
                         f"declares no size, over its {bound}-byte bound")


def decode_stream(
    codec: str,
    delta: Source,
    base: Source | None,
    sink: Callable[[bytes | memoryview], object],
    *,
    target_size: int | None = None,
    max_memory_bytes: int | None = None,
) -> None:
    """Write the target to ``sink`` piece by piece. Raises CodecError (UnknownCodec, ...).

    With ``target_size`` (the signed size) every header field is checked against it before
    anything is allocated; with ``max_memory_bytes`` a tensor-xor header whose own figures
    exceed the cap is refused before its skeleton is built. The agent runs this only in a
    contained child process (``confined``); the server calls it on its own, trusted bytes."""
    if codec not in CODECS:
        raise UnknownCodec(f"unknown codec {codec!r}")
    try:
        if codec == IDENTITY:
            for off in range(0, delta.size, STREAM_PIECE_BYTES):
                sink(delta.read_at(off, min(STREAM_PIECE_BYTES, delta.size - off)))
            return
        if codec == ZSTD:
            check_zstd_frame(codec, delta, 0, target_size)
            _stream_zstd(zstd.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES), delta, sink,
                         target_size, codec)
            return
        if base is None:
            raise CodecError(f"codec {codec} needs the base model")
        if codec == TENSOR_XOR:
            for piece in _iter_tensor_xor(delta, base, target_size, max_memory_bytes):
                sink(piece)
        elif codec == BSDIFF4:
            try:
                stream_patch(delta, base, sink, target_size)
            except ValueError as e:
                raise CodecError(f"bsdiff4 patch is malformed: {e}") from e
        else:
            check_zstd_frame(codec, delta, base.size, target_size)
            dictionary = zstd.ZstdCompressionDict(bytes(base.read_at(0, base.size)),
                                                  dict_type=zstd.DICT_TYPE_RAWCONTENT)
            dctx = zstd.ZstdDecompressor(
                dict_data=dictionary,
                max_window_size=zstd_window_bound(codec, base.size, target_size))
            _stream_zstd(dctx, delta, sink, target_size, codec)
    except (zstd.ZstdError, MemoryError, OverflowError) as e:
        if isinstance(e, MemoryError):
            raise MemoryCapExceeded(f"{codec} decode ran out of memory") from e
        raise CodecError(f"{codec} failed: {e}") from e
    except ValueError as e:
        if isinstance(e, CodecError):
            raise
        raise CodecError(f"{codec} failed: {e}") from e


def target_size_of(codec: str, delta: Source) -> int | None:
    """The target size a delta declares, where its format records one."""
    if codec == TENSOR_XOR:
        return int(read_tx_header(delta)[0]["target_size"])  # trusted bytes only (server)
    return None


def check_memory(codec: str, base_size: int, target_size: int, delta_size: int,
                 max_memory_bytes: int | None) -> None:
    """MemoryCapExceeded before any work when the decode is predicted to exceed the cap."""
    if codec not in CODECS:
        raise UnknownCodec(f"unknown codec {codec!r}")
    cap = _cap(max_memory_bytes)
    need = predicted_decode_bytes(codec, base_size, target_size, delta_size)
    if need > cap:
        raise MemoryCapExceeded(
            f"applying a {codec} artifact needs about {need >> 20} MiB, over the {cap >> 20} MiB cap"
        )


def decode_to_file(
    codec: str,
    delta: Source,
    base_path: Path | None,
    dest: Path,
    *,
    target_size: int,
    expect_sha256: str | None = None,
    max_memory_bytes: int | None = None,
) -> str:
    """Decode into ``dest`` durably (temp file beside it, fsync, rename, fsync dir) and return
    the sha256 of what was written. ``dest`` appears only when the output has ``target_size``
    bytes and, when given, ``expect_sha256`` (else TargetMismatch); nothing is left at
    ``dest`` or beside it when decoding fails."""
    base: FileSource | None = None
    if codec not in FULL_CODECS:
        if base_path is None or not Path(base_path).exists():
            raise CodecError("delta needs the base model, which is not on disk")
        base = FileSource(base_path)
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    h = hashlib.sha256()
    written = 0
    try:
        check_memory(codec, base.size if base else 0, target_size, delta.size, max_memory_bytes)
        with os.fdopen(fd, "wb") as out:

            def sink(piece: bytes | memoryview) -> None:
                nonlocal written
                written += len(piece)
                if written > target_size:
                    raise CodecError("patched output is longer than the target")
                h.update(piece)
                out.write(piece)

            decode_stream(codec, delta, base, sink, target_size=target_size,
                          max_memory_bytes=_cap(max_memory_bytes))
            if written != target_size:
                raise CodecError("patched output is shorter than the target")
            if expect_sha256 is not None and h.hexdigest() != expect_sha256:
                raise TargetMismatch("decoded output is not the signed target (sha256 differs)")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if base is not None:
            base.close()
    fsync_dir(dest.parent)
    return h.hexdigest()


def decode(
    codec: str,
    delta: bytes | bytearray | memoryview,
    base_path: Path | None,
    *,
    target_size: int,
    max_memory_bytes: int | None = None,
) -> bytes | bytearray:
    """The target bytes in memory (tests, simulators and small models; the agent itself
    streams to disk with ``decode_to_file``). The caller checks the signed sha256."""
    if codec not in CODECS:
        raise UnknownCodec(f"unknown codec {codec!r}")
    base: FileSource | None = None
    if codec not in FULL_CODECS:
        if base_path is None or not Path(base_path).exists():
            raise CodecError("delta needs the base model, which is not on disk")
        base = FileSource(base_path)
    try:
        check_memory(codec, base.size if base else 0, target_size, len(delta),
                     None if max_memory_bytes is None else max_memory_bytes - target_size)
        out = bytearray(target_size)
        view = memoryview(out)
        pos = 0

        def sink(piece: bytes | memoryview) -> None:
            nonlocal pos
            n = len(piece)
            if pos + n > target_size:
                raise CodecError("patched output is longer than the target")
            view[pos : pos + n] = piece
            pos += n

        decode_stream(codec, BytesSource(delta), base, sink, target_size=target_size,
                      max_memory_bytes=_cap(max_memory_bytes) - target_size)
        if pos != target_size:
            raise CodecError("patched output is shorter than the target")
        view.release()
        return out
    finally:
        if base is not None:
            base.close()


def decode_sha256(codec: str, delta_path: Path, base_path: Path | None) -> tuple[str, int]:
    """(sha256, size) of the decoded target, streamed: used by the server to verify a delta."""
    h = hashlib.sha256()
    size = 0

    def sink(piece: bytes | memoryview) -> None:
        nonlocal size
        h.update(piece)
        size += len(piece)

    with FileSource(delta_path) as delta:
        base = FileSource(base_path) if base_path is not None else None
        try:
            decode_stream(codec, delta, base, sink)
        finally:
            if base is not None:
                base.close()
    return h.hexdigest(), size


__all__ = [
    "BSDIFF4",
    "CODECS",
    "FULL_CODECS",
    "IDENTITY",
    "TENSOR_XOR",
    "ZSTD",
    "ZSTD_DICT",
    "BytesSource",
    "ChunkSource",
    "CodecError",
    "FileSource",
    "MemoryCapExceeded",
    "Source",
    "SourceReader",
    "TargetMismatch",
    "UnknownCodec",
    "check_memory",
    "decode",
    "decode_sha256",
    "decode_stream",
    "decode_to_file",
    "predicted_decode_bytes",
    "unzigzag",
    "zigzag",
]
