"""Codec names: the manifest's ``artifact.codec`` vocabulary, shared by encoder and decoder.

Adding a codec means adding its name here, a decoder in ``decoders`` and a prediction in
``memory``; a name outside ``CODECS`` is refused everywhere (``UnknownCodec``).
"""

from __future__ import annotations

IDENTITY = "identity"
ZSTD = "zstd"
BSDIFF4 = "bsdiff4"
ZSTD_DICT = "zstd-dict"
TENSOR_XOR = "tensor-xor"
CODECS = (IDENTITY, ZSTD, BSDIFF4, ZSTD_DICT, TENSOR_XOR)
FULL_CODECS = (IDENTITY, ZSTD)  # no base needed

ZSTD_MAX_WINDOW_BYTES = 1 << 27  # a full-model frame may not ask a device for more
STREAM_PIECE_BYTES = 1 << 20  # what a streaming decoder hands its sink at a time

__all__ = [
    "BSDIFF4",
    "CODECS",
    "FULL_CODECS",
    "IDENTITY",
    "STREAM_PIECE_BYTES",
    "TENSOR_XOR",
    "ZSTD",
    "ZSTD_DICT",
    "ZSTD_MAX_WINDOW_BYTES",
]
