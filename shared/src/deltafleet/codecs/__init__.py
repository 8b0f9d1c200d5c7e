"""deltafleet.codecs: the delta formats both sides agree on, and their streaming decoders.

A neutral package inside ``deltafleet-shared`` (install ``deltafleet-shared[codecs]`` for its
numpy and zstandard): the agent decodes with it on a device, the server round-trips every
delta it builds with it, and neither imports the other. Modules, by what they are:

- ``names``: the codec vocabulary (``IDENTITY``, ``ZSTD``, ``BSDIFF4``, ...);
- ``errors``: ``CodecError`` and its kinds, under ``DeltafleetError``;
- ``source``: random-access inputs (``Source``, ``BytesSource``, ``FileSource``, ...);
- ``tensor_xor``: the tensor-xor container format (header, planes, zigzag, skeleton);
- ``bsdiff_stream``: BSDIFF40 applied streaming (standard library only);
- ``memory``: decode-memory prediction and the cap;
- ``decoders``: ``decode_stream`` (to a sink), ``decode`` (in memory), ``decode_sha256``.

Encoders live with the server (``deltafleet.server.codecs``); staging a decoded file durably
and containing the decoder in a child live with the agent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CodecError, MemoryCapExceeded, TargetMismatch, UnknownCodec
from .names import (
    BSDIFF4,
    CODECS,
    FULL_CODECS,
    IDENTITY,
    STREAM_PIECE_BYTES,
    TENSOR_XOR,
    ZSTD,
    ZSTD_DICT,
    ZSTD_MAX_WINDOW_BYTES,
)

if TYPE_CHECKING:
    from .decoders import (
        Sink,
        check_zstd_frame,
        decode,
        decode_sha256,
        decode_stream,
        zstd_window_bound,
    )
    from .memory import (
        check_memory,
        default_memory_cap_bytes,
        memory_cap_bytes,
        predicted_decode_bytes,
        tx_decode_bytes,
    )
    from .source import BytesSource, ChunkSource, FileSource, Source, SourceReader
    from .tensor_xor import (
        TX_CHUNK_BYTES,
        TX_VERSION,
        base_skeleton,
        pack_tx_header,
        planes_of,
        unpack_tx_header,
        unzigzag,
        zigzag,
    )

# Names and errors import nothing but the standard library (a planner reads codec names
# without numpy); the rest loads on first use.
_LAZY = {
    "decoders": ("Sink", "check_zstd_frame", "decode", "decode_sha256", "decode_stream",
               "zstd_window_bound"),
    "memory": ("check_memory", "default_memory_cap_bytes", "memory_cap_bytes",
               "predicted_decode_bytes", "tx_decode_bytes"),
    "source": ("BytesSource", "ChunkSource", "FileSource", "Source", "SourceReader"),
    "tensor_xor": ("TX_CHUNK_BYTES", "TX_VERSION", "base_skeleton", "pack_tx_header",
                   "planes_of", "unpack_tx_header", "unzigzag", "zigzag"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BSDIFF4",
    "CODECS",
    "FULL_CODECS",
    "IDENTITY",
    "STREAM_PIECE_BYTES",
    "TENSOR_XOR",
    "TX_CHUNK_BYTES",
    "TX_VERSION",
    "ZSTD",
    "ZSTD_DICT",
    "ZSTD_MAX_WINDOW_BYTES",
    "BytesSource",
    "ChunkSource",
    "CodecError",
    "FileSource",
    "MemoryCapExceeded",
    "Sink",
    "Source",
    "SourceReader",
    "TargetMismatch",
    "UnknownCodec",
    "base_skeleton",
    "check_memory",
    "check_zstd_frame",
    "decode",
    "decode_sha256",
    "decode_stream",
    "default_memory_cap_bytes",
    "memory_cap_bytes",
    "pack_tx_header",
    "planes_of",
    "predicted_decode_bytes",
    "tx_decode_bytes",
    "unpack_tx_header",
    "unzigzag",
    "zigzag",
    "zstd_window_bound",
]
