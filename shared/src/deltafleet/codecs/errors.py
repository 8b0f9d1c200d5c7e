"""Codec errors: every refusal of a delta, under the project's error root.

``CodecError`` is the artifact's fault (malformed, built for another base, a lying header) or
the decode's budget (``MemoryCapExceeded``); callers on either side wrap it at their edge
(the agent into ``UpdateRejected``, the server into a failed build).
"""

from __future__ import annotations

from deltafleet.shared.errors import DeltafleetError


class CodecError(DeltafleetError):
    """The delta cannot be applied: malformed, wrong base, or over the memory cap."""


class UnknownCodec(CodecError):
    """The codec name is not one of ``names.CODECS``."""


class MemoryCapExceeded(CodecError):
    """Decoding would need (predicted) or needed (hit) more memory than the cap allows."""


class TargetMismatch(CodecError):
    """The decoded bytes are not the expected target (sha256 differs)."""


class PatchMalformed(CodecError, ValueError):
    """The delta's own structure does not parse (a BSDIFF40 stream, a tensor-xor header).
    Also a ``ValueError``: the decoders catch that and wrap it with the codec's name."""


__all__ = ["CodecError", "MemoryCapExceeded", "PatchMalformed", "TargetMismatch", "UnknownCodec"]
