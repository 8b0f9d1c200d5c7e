"""The streaming bspatch decoder, now ``deltafleet.codecs.bsdiff_stream`` (kept importable)."""

from deltafleet.codecs.bsdiff_stream import add_bytes, read_header, stream_patch

__all__ = ["add_bytes", "read_header", "stream_patch"]
