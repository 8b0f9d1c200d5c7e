"""Streaming bspatch (standard library only). The agent runs it in its contained decoder child
(``deltafleet.agent.confined``); the server's round trip runs it in-process.

``stream_patch`` is the decoder itself. It
never holds more than the patch, one piece of each bz2 block and one piece of output: the base
is read range by range (``read_at``), the three blocks are decompressed as they are consumed,
each bounded (control <= 24 bytes per output byte, diff and extra <= the output size), and the
output goes to ``sink`` in pieces of about 1 MiB.

BSDIFF40 semantics (as bsdiff4's C core): for each control triple (x, y, z): x bytes of the diff
block added bytewise to the base from ``oldpos`` (base bytes outside the file count as 0), then
y bytes of the extra block copied, then ``oldpos`` moves by z.
"""

from __future__ import annotations

import bz2
import struct

from .errors import PatchMalformed

PIECE = 1 << 20
FEED = 1 << 18
_MASK = (1 << 63) - 1
_SIGN = 1 << 63
_TRIPLE = struct.Struct("<QQQ")
_masks: dict[int, tuple[int, int]] = {}


def add_bytes(a: bytes | memoryview, b: bytes | memoryview) -> bytes:
    """Bytewise ``(a[i] + b[i]) & 0xff`` for equal lengths, as one big-integer operation
    (SWAR: add the low 7 bits of every byte, then xor in the top bits, so no carry crosses
    a byte)."""
    n = len(a)
    masks = _masks.get(n)
    if masks is None:
        masks = (int.from_bytes(b"\x7f" * n, "little"), int.from_bytes(b"\x80" * n, "little"))
        if n == PIECE or len(_masks) < 8:
            _masks[n] = masks
    low, high = masks
    x, y = int.from_bytes(a, "little"), int.from_bytes(b, "little")
    return (((x & low) + (y & low)) ^ ((x ^ y) & high)).to_bytes(n, "little")


def _int64(raw: bytes) -> int:
    value = int.from_bytes(raw, "little") & _MASK
    return -value if raw[7] & 0x80 else value


class _Block:
    """One bz2 block of the patch, decompressed on demand and never beyond ``limit`` bytes."""

    def __init__(self, patch, offset: int, length: int, limit: int, what: str) -> None:  # noqa: ANN001
        self._patch = patch  # anything with read_at(offset, length)
        self._pos = offset
        self._end = offset + length
        self._limit = limit
        self._what = what
        self._d = bz2.BZ2Decompressor()
        self._buf = b""
        self._off = 0
        self._produced = 0

    def _more(self) -> bool:
        """Refill the buffer; False at the end of the block."""
        while True:
            if self._d.eof:
                return False
            if self._d.needs_input:
                n = min(FEED, self._end - self._pos)
                if n <= 0:
                    raise PatchMalformed(f"{self._what} block is truncated")
                data = bytes(self._patch.read_at(self._pos, n))
                self._pos += n
            else:
                data = b""
            try:
                out = self._d.decompress(data, max_length=PIECE)
            except (OSError, EOFError, ValueError) as e:
                raise PatchMalformed(f"{self._what} block is not valid bz2: {e}") from e
            if out:
                self._produced += len(out)
                if self._produced > self._limit:
                    raise PatchMalformed(f"{self._what} block expands beyond {self._limit} bytes "
                                     "(bz2 bomb)")
                self._buf, self._off = out, 0
                return True

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the block)."""
        if self._off >= len(self._buf) and not self._more():
            return b""
        out = self._buf[self._off : self._off + n]
        self._off += len(out)
        return out

    def read_exactly(self, n: int) -> bytes:
        out = self.read(n)
        if len(out) == n:
            return out
        parts = [out]
        got = len(out)
        while got < n:
            more = self.read(n - got)
            if not more:
                raise PatchMalformed(f"{self._what} block is shorter than the control block says")
            parts.append(more)
            got += len(more)
        return b"".join(parts)


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self.size = len(data)

    def read_at(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]


def read_header(patch) -> tuple[int, int, int]:  # noqa: ANN001
    """(control length, diff length, new size); PatchMalformed when malformed."""
    if patch.size < 32:
        raise PatchMalformed("not a BSDIFF40 patch")
    head = bytes(patch.read_at(0, 32))
    if head[:8] != b"BSDIFF40":
        raise PatchMalformed("not a BSDIFF40 patch")
    ctrl, diff, new = (_int64(head[i : i + 8]) for i in (8, 16, 24))
    if min(ctrl, diff, new) < 0 or 32 + ctrl + diff > patch.size:
        raise PatchMalformed("bad lengths in the patch header")
    return ctrl, diff, new


def _triples(control: _Block):  # noqa: ANN202
    rest = b""
    while True:
        data = control.read(24 * 4096)
        if not data:
            if rest:
                raise PatchMalformed("control block is not a list of triples")
            return
        data = rest + data
        usable = len(data) - len(data) % 24
        rest = data[usable:]
        for triple in _TRIPLE.iter_unpack(data[:usable]):
            yield tuple(-(v & _MASK) if v & _SIGN else v for v in triple)


def stream_patch(patch, base, sink, target_size: int | None = None) -> int:  # noqa: ANN001
    """Apply a BSDIFF40 ``patch`` (``read_at``/``size``) to ``base`` (``read_at``/``size``),
    writing the target to ``sink``; returns the number of bytes written."""
    if not hasattr(patch, "read_at"):  # a file-like reader: the whole patch, once
        patch = _Bytes(patch.read())
    ctrl_len, diff_len, new = read_header(patch)
    if target_size is not None and new != target_size:
        raise PatchMalformed(f"patch declares {new} output bytes, expected {target_size}")
    control = _Block(patch, 32, ctrl_len, 24 * (new + 1), "control")
    diff = _Block(patch, 32 + ctrl_len, diff_len, new, "diff")
    extra = _Block(patch, 32 + ctrl_len + diff_len, patch.size - 32 - ctrl_len - diff_len, new,
                   "extra")
    old_size = base.size
    out = bytearray()
    newpos = oldpos = 0
    for x, y, z in _triples(control):
        if x < 0 or y < 0 or newpos + x + y > new:
            raise PatchMalformed("control triple runs past the declared output size")
        done = 0
        while done < x:
            piece = diff.read_exactly(min(PIECE, x - done))
            n = len(piece)
            lo, hi = max(oldpos, 0), min(oldpos + n, old_size)
            if lo < hi:  # base bytes outside the base count as zero
                out += piece[: lo - oldpos]
                out += add_bytes(piece[lo - oldpos : hi - oldpos], base.read_at(lo, hi - lo))
                out += piece[hi - oldpos :]
            else:
                out += piece
            oldpos += n
            done += n
            if len(out) >= PIECE:
                sink(bytes(out))
                out.clear()
        newpos += x
        done = 0
        while done < y:
            piece = extra.read_exactly(min(PIECE, y - done))
            out += piece
            done += len(piece)
            if len(out) >= PIECE:
                sink(bytes(out))
                out.clear()
        newpos += y
        oldpos += z
    if out:
        sink(bytes(out))
    if newpos != new:
        raise PatchMalformed(f"patch produced {newpos} bytes, declared {new}")
    return newpos


__all__ = ["add_bytes", "read_header", "stream_patch"]
