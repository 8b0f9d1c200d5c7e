"""The agent's side of the codecs: the neutral decoders (``deltafleet.codecs``) plus staging.

Every name of ``deltafleet.codecs`` (codec names, errors, sources, the tensor-xor format,
``decode_stream``, memory prediction) is importable from here, so agent modules keep one
import. What is the device's own: ``decode_to_file``, which streams a decode into a staging
file beside ``dest`` (``deltafleet.shared.staged_file``: hashed while written, fsynced, renamed
into place only with the signed size and sha256). The agent itself decodes untrusted bytes
only in its contained child (``confined``); ``decode_to_file`` is the in-process form the
benchmarks compare it with.
"""

from __future__ import annotations

from pathlib import Path

from deltafleet.codecs import (
    BSDIFF4,
    CODECS,
    FULL_CODECS,
    IDENTITY,
    STREAM_PIECE_BYTES,
    TENSOR_XOR,
    TX_CHUNK_BYTES,
    TX_VERSION,
    ZSTD,
    ZSTD_DICT,
    ZSTD_MAX_WINDOW_BYTES,
    BytesSource,
    ChunkSource,
    CodecError,
    FileSource,
    MemoryCapExceeded,
    Source,
    SourceReader,
    TargetMismatch,
    UnknownCodec,
    base_skeleton,
    check_memory,
    check_zstd_frame,
    decode,
    decode_sha256,
    decode_stream,
    default_memory_cap_bytes,
    memory_cap_bytes,
    pack_tx_header,
    planes_of,
    predicted_decode_bytes,
    tx_decode_bytes,
    unpack_tx_header,
    unzigzag,
    zigzag,
    zstd_window_bound,
)
from deltafleet.codecs.tensor_xor import (
    BZ2_MAGIC,
    TX_MAGIC,
    TX_PREFIX,
    UINT_DTYPES,
    check_tx_header,
    header_json_limit,
    read_tx_header,
)
from deltafleet.shared import StagedMismatch, staged_file

_UINT = UINT_DTYPES


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
    """Decode into ``dest`` durably and return the sha256 of what was written. ``dest``
    appears only when the output has ``target_size`` bytes (else CodecError) and, when given,
    ``expect_sha256`` (else TargetMismatch); nothing is left at ``dest`` or beside it when
    decoding fails."""
    base: FileSource | None = None
    if codec not in FULL_CODECS:
        if base_path is None or not Path(base_path).exists():
            raise CodecError("delta needs the base model, which is not on disk")
        base = FileSource(base_path)
    try:
        check_memory(codec, base.size if base else 0, target_size, delta.size, max_memory_bytes)
        with staged_file(Path(dest), expect_size=target_size,
                         expect_sha256=expect_sha256) as out:
            decode_stream(codec, delta, base, out.write, target_size=target_size,
                          max_memory_bytes=memory_cap_bytes(max_memory_bytes))
        return out.sha256
    except StagedMismatch as e:
        if e.what == "sha256":
            raise TargetMismatch("decoded output is not the signed target (sha256 differs)") from e
        raise CodecError(f"patched output {str(e).removeprefix('staged file ')}") from e
    finally:
        if base is not None:
            base.close()


__all__ = [
    "BSDIFF4",
    "BZ2_MAGIC",
    "CODECS",
    "FULL_CODECS",
    "IDENTITY",
    "STREAM_PIECE_BYTES",
    "TENSOR_XOR",
    "TX_CHUNK_BYTES",
    "TX_MAGIC",
    "TX_PREFIX",
    "TX_VERSION",
    "ZSTD",
    "ZSTD_DICT",
    "ZSTD_MAX_WINDOW_BYTES",
    "BytesSource",
    "ChunkSource",
    "CodecError",
    "FileSource",
    "MemoryCapExceeded",
    "Source",
    "SourceReader",
    "TargetMismatch",
    "UnknownCodec",
    "base_skeleton",
    "check_memory",
    "check_tx_header",
    "check_zstd_frame",
    "decode",
    "decode_sha256",
    "decode_stream",
    "decode_to_file",
    "default_memory_cap_bytes",
    "header_json_limit",
    "memory_cap_bytes",
    "pack_tx_header",
    "planes_of",
    "predicted_decode_bytes",
    "read_tx_header",
    "tx_decode_bytes",
    "unpack_tx_header",
    "unzigzag",
    "zigzag",
    "zstd_window_bound",
]
