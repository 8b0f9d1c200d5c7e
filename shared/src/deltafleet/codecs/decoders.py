"""Streaming decoders: turn (base, verified delta) into the target bytes within a memory cap.

Pure numpy / zstandard / the stdlib bspatch (``bsdiff_stream``), so a device can apply every
codec the server may choose without onnx, protobuf or any server code; the server round-trips
every delta it builds through the same functions, so encoder and decoder cannot drift apart.

Codecs (``names``; the manifest's ``artifact.codec``):

``identity``
    The artifact is the target (a full model, shipped as it is).
``zstd``
    A full model as one zstd frame (no base). Streams with a window of at most 128 MiB.
``bsdiff4``
    Classic bsdiff (BSDIFF40), applied streaming: the base is read range by range and the
    target written as it is produced (``bsdiff_stream.stream_patch``).
``zstd-dict``
    zstd frame compressed with the whole base as a raw-content dictionary and a window that
    covers it (the semantics of ``zstd --patch-from``). The decoder holds the dictionary (one
    copy of the base) and its window (up to the target size); the output streams.
``tensor-xor``
    The model-aware container (``tensor_xor``): segment by segment, peak the skeleton plus
    one chunk.

Every decoder writes to a *sink* piece by piece (``decode_stream``), so no codec holds the
target in memory; ``decode`` collects it (tests, simulators, small models) and
``decode_sha256`` hashes it (the server's round trip). Every failure is a ``CodecError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, cast

import numpy as np
import zstandard as zstd

from .bsdiff_stream import stream_patch
from .errors import CodecError, MemoryCapExceeded, UnknownCodec
from .memory import check_memory, memory_cap_bytes, tx_decode_bytes
from .names import (
    BSDIFF4,
    CODECS,
    FULL_CODECS,
    IDENTITY,
    STREAM_PIECE_BYTES,
    TENSOR_XOR,
    ZSTD,
    ZSTD_MAX_WINDOW_BYTES,
)
from .source import BytesSource, FileSource, Source, SourceReader
from .tensor_xor import TX_CHUNK_BYTES, UINT_DTYPES, base_skeleton, decompress_frame, read_tx_header, unzigzag

Sink = Callable[[bytes | memoryview], object]


def iter_tensor_xor(delta: Source, base: Source, target_size: int | None = None,
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
        decompress_frame(skel_frame, skel_raw, zstd.ZstdDecompressor(dict_data=skel_dict)))
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
                elements[:, k] = np.frombuffer(decompress_frame(frame, n, dctx), dtype=np.uint8)
            values = elements.reshape(-1).view(UINT_DTYPES[width])
            if op in ("xor", "sub", "zsub"):
                old = np.frombuffer(base.read_at(b_off, length), dtype=UINT_DTYPES[width])
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



def _stream_zstd(dctx: zstd.ZstdDecompressor, delta: Source, sink: Sink,
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
    sink: Sink,
    *,
    target_size: int | None = None,
    max_memory_bytes: int | None = None,
) -> None:
    """Write the target to ``sink`` piece by piece. Raises CodecError (UnknownCodec, ...).

    With ``target_size`` (the signed size) every header field is checked against it before
    anything is allocated; with ``max_memory_bytes`` a tensor-xor header whose own figures
    exceed the cap is refused before its skeleton is built. The agent runs this only in a
    contained child process (``deltafleet.agent.confined``); the server calls it on its own, trusted bytes."""
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
            for piece in iter_tensor_xor(delta, base, target_size, max_memory_bytes):
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
        raise CodecError(f"{codec} failed: {e}") from e


def open_base(codec: str, base_path: Path | None) -> FileSource | None:
    """The base a delta of ``codec`` reads (None for a full codec); CodecError when it is
    needed and not on disk. The caller closes it."""
    if codec in FULL_CODECS:
        return None
    if base_path is None or not Path(base_path).exists():
        raise CodecError("delta needs the base model, which is not on disk")
    return FileSource(base_path)


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
    base = open_base(codec, base_path)
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
                      max_memory_bytes=memory_cap_bytes(max_memory_bytes) - target_size)
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
    "Sink",
    "check_zstd_frame",
    "decode",
    "decode_sha256",
    "decode_stream",
    "iter_tensor_xor",
    "open_base",
    "zstd_window_bound",
]
