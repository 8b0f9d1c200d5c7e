"""The agent's own side of the codecs: staging a decode durably. The neutral decoders, names,
errors and sources are ``deltafleet.codecs``; import them from there.

``decode_to_file`` streams a decode into a staging file beside ``dest``
(``deltafleet.shared.staged_file``: hashed while written, fsynced, renamed into place only with
the signed size and sha256). The agent itself decodes untrusted bytes only in its contained
child (``confined``); ``decode_to_file`` is the in-process form the benchmarks compare it with.
``staged_mismatch`` is the one reading of a staged decode's mismatch both use.
"""

from __future__ import annotations

from pathlib import Path

from deltafleet.codecs import (
    CodecError,
    Source,
    TargetMismatch,
    check_memory,
    decode_stream,
    memory_cap_bytes,
    open_base,
)
from deltafleet.shared import StagedMismatch, staged_file


def staged_mismatch(e: StagedMismatch, otherwise: CodecError) -> CodecError:
    """What a decode staged against the signed target raises for ``e``: TargetMismatch when
    the sha256 differs, ``otherwise`` when the size does."""
    if e.what == "sha256":
        return TargetMismatch("decoded output is not the signed target (sha256 differs)")
    return otherwise


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
    base = open_base(codec, base_path)
    try:
        check_memory(codec, base.size if base else 0, target_size, delta.size, max_memory_bytes)
        with staged_file(Path(dest), expect_size=target_size,
                         expect_sha256=expect_sha256) as out:
            decode_stream(codec, delta, base, out.write, target_size=target_size,
                          max_memory_bytes=memory_cap_bytes(max_memory_bytes))
        return out.sha256
    except StagedMismatch as e:
        raise staged_mismatch(
            e, CodecError(f"patched output {str(e).removeprefix('staged file ')}")) from e
    finally:
        if base is not None:
            base.close()


__all__ = ["decode_to_file", "staged_mismatch"]
