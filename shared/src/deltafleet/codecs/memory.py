"""Decode-memory prediction: what a decode may cost, checked before it starts.

Every figure is an upper estimate of the decoder's peak when its output streams to a sink
(the agent's confined child, the server's round trip); an in-memory ``decode`` adds the target
it returns. The cap defaults to half the machine's physical memory, since a device also runs
the model it serves.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import MemoryCapExceeded, UnknownCodec
from .names import (
    BSDIFF4,
    CODECS,
    IDENTITY,
    STREAM_PIECE_BYTES,
    TENSOR_XOR,
    ZSTD,
    ZSTD_DICT,
    ZSTD_MAX_WINDOW_BYTES,
)
from .tensor_xor import TX_CHUNK_BYTES

# Interpreter, numpy and zstd contexts, counted once in every prediction.
FIXED_OVERHEAD_BYTES = 64 << 20


def predicted_decode_bytes(codec: str, base_size: int, target_size: int, delta_size: int) -> int:
    """Upper estimate of the decoder's peak memory when the output streams to a file;
    ``decode`` adds the target it returns. bsdiff4's figure is its child process's."""
    if codec == IDENTITY:
        return FIXED_OVERHEAD_BYTES + STREAM_PIECE_BYTES
    if codec == ZSTD:
        return FIXED_OVERHEAD_BYTES + min(target_size, ZSTD_MAX_WINDOW_BYTES) + 2 * STREAM_PIECE_BYTES
    if codec == BSDIFF4:  # the patch is read from its chunk files, range by range
        return FIXED_OVERHEAD_BYTES + 8 * STREAM_PIECE_BYTES
    if codec == ZSTD_DICT:
        # base read, then its dictionary copy (the read is freed), plus the window
        return FIXED_OVERHEAD_BYTES + max(2 * base_size, base_size + target_size)
    if codec == TENSOR_XOR:
        # the least it can need; the decoder checks the header's own figures (skeleton sizes,
        # chunk_bytes: ``tx_decode_bytes``) against the cap before it allocates them
        return FIXED_OVERHEAD_BYTES + 8 * TX_CHUNK_BYTES
    raise UnknownCodec(f"unknown codec {codec!r}")


def tx_decode_bytes(header: dict[str, Any]) -> int:
    """Peak memory of the tensor-xor decoder for a checked header: the base skeleton (read,
    joined, and its dictionary), the target skeleton, and one chunk's arrays."""
    base_skel = header["base_size"] - sum(length for _, length in header["base_ranges"])
    return (FIXED_OVERHEAD_BYTES + 3 * base_skel + header["skeleton"][2]
            + 6 * header["chunk_bytes"] + TX_CHUNK_BYTES)


def default_memory_cap_bytes() -> int:
    """Half the machine's physical memory (a device also runs the model it serves)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def memory_cap_bytes(max_memory_bytes: int | None) -> int:
    """The cap a decode runs under: the one given, else ``default_memory_cap_bytes``."""
    return default_memory_cap_bytes() if max_memory_bytes is None else max_memory_bytes


def check_memory(codec: str, base_size: int, target_size: int, delta_size: int,
                 max_memory_bytes: int | None) -> None:
    """MemoryCapExceeded before any work when the decode is predicted to exceed the cap."""
    if codec not in CODECS:
        raise UnknownCodec(f"unknown codec {codec!r}")
    cap = memory_cap_bytes(max_memory_bytes)
    need = predicted_decode_bytes(codec, base_size, target_size, delta_size)
    if need > cap:
        raise MemoryCapExceeded(
            f"applying a {codec} artifact needs about {need >> 20} MiB, over the {cap >> 20} MiB cap"
        )


__all__ = [
    "FIXED_OVERHEAD_BYTES",
    "check_memory",
    "default_memory_cap_bytes",
    "memory_cap_bytes",
    "predicted_decode_bytes",
    "tx_decode_bytes",
]
