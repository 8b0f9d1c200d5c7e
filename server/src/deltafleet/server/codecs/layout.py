"""Where the tensors are: byte ranges of weight data inside ONNX and TFLite files.

Both walkers read only headers through ``Source.read_at`` (pread), never the weights, so a
1 GB model costs a few kilobytes of reads and memory. They deliberately do not use the onnx or
tflite packages: those need the whole file in memory and do not expose byte offsets.
Anything the walkers do not recognise stays in the "skeleton" and is diffed as plain bytes,
so a walker that misses a tensor costs size, never correctness (every delta is round-tripped).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from deltafleet.codecs import CodecError, Source

# ONNX TensorProto.DataType -> element width in bytes (unknown types are treated as bytes).
_ONNX_WIDTH = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
               14: 8, 15: 16, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1}
# TFLite TensorType -> element width in bytes.
_TFLITE_WIDTH = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8, 12: 8, 13: 4,
                 15: 4, 16: 2, 17: 1}
_WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True, slots=True)
class TensorRange:
    name: str
    offset: int
    length: int
    itemsize: int  # 1, 2, 4 or 8: the unit XOR / SUB / byte planes work on
    dtype: str  # format-specific type tag, for pairing


class MalformedLayout(CodecError):
    """The file's structure cannot be walked (a lying length, a truncated message): the
    walker gives up and the whole file is diffed as plain bytes."""


def _width(w: int) -> int:
    return w if w in _WIDTHS else 1


# ------------------------------------------------------------------ ONNX (protobuf)


def _varint(src: Source, pos: int, end: int) -> tuple[int, int]:
    raw = bytes(src.read_at(pos, min(10, end - pos)))
    value = shift = 0
    for i, b in enumerate(raw):
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos + i + 1
        shift += 7
    raise MalformedLayout("bad varint")


def _fields(src: Source, start: int, end: int):  # type: ignore[no-untyped-def]
    """(field number, wire type, value or (offset, length)) of one protobuf message."""
    pos = start
    while pos < end:
        key, pos = _varint(src, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MalformedLayout("field 0")
        if wire == 0:
            value, pos = _varint(src, pos, end)
            yield number, wire, value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(src, pos, end)
            if pos + length > end:
                raise MalformedLayout("field runs past its message")
            yield number, wire, (pos, length)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise MalformedLayout(f"wire type {wire}")
    if pos != end:
        raise MalformedLayout("message overruns")


def _onnx_tensor(src: Source, start: int, end: int) -> TensorRange | None:
    name, dtype, data = "", 0, None
    for number, wire, value in _fields(src, start, end):
        if number == 2 and wire == 0:
            dtype = value
        elif number == 8 and wire == 2:
            off, length = value
            name = bytes(src.read_at(off, min(length, 4096))).decode("utf-8", "replace")
        elif number == 9 and wire == 2:  # raw_data
            data = value
        elif number in (4, 10) and wire == 2 and data is None:  # packed float_data / double_data
            data = value
            dtype = 1 if number == 4 else 11
    if data is None or data[1] == 0:
        return None
    return TensorRange(name, data[0], data[1], _width(_ONNX_WIDTH.get(dtype, 1)), f"onnx:{dtype}")


_MAX_GRAPH_DEPTH = 16


def _onnx_graph(src: Source, start: int, end: int, out: list[TensorRange], depth: int) -> None:
    """Initializers of a GraphProto, and tensors held in node attributes (``Constant`` values,
    anywhere in ``If`` / ``Loop`` / ``Scan`` subgraphs): exporters put weights there too."""
    if depth > _MAX_GRAPH_DEPTH:
        raise MalformedLayout("subgraphs nested too deep")
    for number, wire, value in _fields(src, start, end):
        if number == 5 and wire == 2:  # GraphProto.initializer
            t = _onnx_tensor(src, value[0], value[0] + value[1])
            if t is not None:
                out.append(t)
        elif number == 1 and wire == 2:  # GraphProto.node
            _onnx_node(src, value[0], value[0] + value[1], out, depth)


def _onnx_node(src: Source, start: int, end: int, out: list[TensorRange], depth: int) -> None:
    first_output = ""
    attributes = []
    for number, wire, value in _fields(src, start, end):
        if number == 2 and wire == 2 and not first_output:  # NodeProto.output
            off, length = value
            first_output = bytes(src.read_at(off, min(length, 4096))).decode("utf-8", "replace")
        elif number == 5 and wire == 2:  # NodeProto.attribute
            attributes.append(value)
    for a_off, a_len in attributes:
        for number, wire, value in _fields(src, a_off, a_off + a_len):
            if number in (5, 10) and wire == 2:  # AttributeProto.t / .tensors
                t = _onnx_tensor(src, value[0], value[0] + value[1])
                if t is not None:
                    out.append(t if t.name else TensorRange(first_output, t.offset, t.length,
                                                            t.itemsize, t.dtype))
            elif number in (6, 11) and wire == 2:  # AttributeProto.g / .graphs
                _onnx_graph(src, value[0], value[0] + value[1], out, depth + 1)


def onnx_tensors(src: Source) -> list[TensorRange] | None:
    """Weight data ranges of an ONNX ModelProto (initializers and constant attributes, in
    subgraphs too), in file order, or None if it is not one."""
    try:
        graph = None
        has_ir_version = False
        for number, wire, value in _fields(src, 0, src.size):
            if number == 1 and wire == 0:
                has_ir_version = True
            elif number == 7 and wire == 2:
                graph = value
        if graph is None or not has_ir_version:
            return None
        tensors: list[TensorRange] = []
        g_start, g_len = graph
        _onnx_graph(src, g_start, g_start + g_len, tensors, 0)
        tensors.sort(key=lambda t: t.offset)
        return tensors
    except (CodecError, ValueError):  # MalformedLayout, or a read past the end
        return None


# ------------------------------------------------------------------ TFLite (flatbuffers)


class _FlatBuffer:
    def __init__(self, src: Source) -> None:
        self.src = src

    def u(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, bytes(self.src.read_at(pos, size)))[0]  # type: ignore[no-any-return]

    def field(self, table: int, index: int) -> int | None:
        vtable = table - self.u("<i", table)
        vt_size = self.u("<H", vtable)
        if 4 + 2 * index >= vt_size:
            return None
        off = self.u("<H", vtable + 4 + 2 * index)
        return table + off if off else None

    def vector(self, table: int, index: int) -> tuple[int, int] | None:
        pos = self.field(table, index)
        if pos is None:
            return None
        vec = pos + self.u("<I", pos)
        return vec + 4, self.u("<I", vec)

    def table_at(self, elem: int) -> int:
        return elem + self.u("<I", elem)

    def string(self, table: int, index: int) -> str:
        vec = self.vector(table, index)
        if vec is None:
            return ""
        return bytes(self.src.read_at(vec[0], min(vec[1], 4096))).decode("utf-8", "replace")


def tflite_tensors(src: Source) -> list[TensorRange] | None:
    """Constant buffer ranges of a TFLite model (names and types from the tensors using them)."""
    try:
        if src.size < 8 or bytes(src.read_at(4, 4)) != b"TFL3":
            return None
        fb = _FlatBuffer(src)
        model = fb.u("<I", 0)
        info: dict[int, tuple[str, int]] = {}
        subgraphs = fb.vector(model, 2)
        for s in range(subgraphs[1] if subgraphs else 0):
            sg = fb.table_at(subgraphs[0] + 4 * s)  # type: ignore[index]
            tensors = fb.vector(sg, 0)
            for t in range(tensors[1] if tensors else 0):
                tensor = fb.table_at(tensors[0] + 4 * t)  # type: ignore[index]
                tpos, bpos = fb.field(tensor, 1), fb.field(tensor, 2)
                ttype = fb.u("<b", tpos) if tpos is not None else 0
                buf = fb.u("<I", bpos) if bpos is not None else 0
                if buf and buf not in info:
                    info[buf] = (fb.string(tensor, 3), ttype)
        buffers = fb.vector(model, 4)
        out = []
        for b in range(buffers[1] if buffers else 0):
            buffer = fb.table_at(buffers[0] + 4 * b)  # type: ignore[index]
            name, ttype = info.get(b, (f"buffer{b}", -1))
            width = _width(_TFLITE_WIDTH.get(ttype, 1))
            data = fb.vector(buffer, 0)
            opos, spos = fb.field(buffer, 1), fb.field(buffer, 2)
            if data is not None and data[1]:
                out.append(TensorRange(name, data[0], data[1], width, f"tflite:{ttype}"))
            elif opos is not None and spos is not None:  # > 2 GB models keep buffers outside
                off, size = fb.u("<Q", opos), fb.u("<Q", spos)
                if off > 1 and size and off + size <= src.size:
                    out.append(TensorRange(name, off, size, width, f"tflite:{ttype}"))
        return out
    except (CodecError, ValueError, struct.error):  # MalformedLayout, or a read past the end
        return None


def model_tensors(src: Source) -> tuple[str, list[TensorRange]] | None:
    """("onnx" | "tflite", tensor ranges sorted by offset), or None for an unknown format."""
    for fmt, walker in (("tflite", tflite_tensors), ("onnx", onnx_tensors)):
        found = walker(src)
        if found is not None:
            found.sort(key=lambda t: t.offset)
            clean: list[TensorRange] = []
            for t in found:  # drop overlaps (shared TFLite buffers are listed once anyway)
                if not clean or t.offset >= clean[-1].offset + clean[-1].length:
                    clean.append(t)
            return fmt, clean
    return None
