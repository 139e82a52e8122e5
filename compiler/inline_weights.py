"""Moving the weights of a model stored inline (one .onnx file) into an external data file, reading
its protobuf field by field and copying each weight's bytes from file to file in chunks.

Parsing such a model holds its weights in memory twice while it parses (the file's bytes and the
parsed message), and an ONNX Runtime session built from the serialised model copies them again.
Moved to a data file, they are mapped instead, by onnx-ir and by ONNX Runtime, as for any model saved
with external data; what this holds in memory is the graph's other fields (nodes, names, small
tensors) and one chunk. Protobuf wire format: https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

import io
import os
from pathlib import Path

# field numbers in onnx.proto
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

MIN_BYTES = 1024  # smaller weights stay inline
ALIGN = 4096  # each weight starts on a page, as mapping wants
_CHUNK = 16 * 2**20


class NotMovable(Exception):
    """The file is not an inline ONNX model this can rewrite (truncated, not protobuf, or it already
    keeps weights in external data): the caller loads it as it is, and reports what is wrong."""


def move_weights_out(src: str | os.PathLike, model_path: str | os.PathLike, data_name: str) -> int:
    """Write ``src`` to ``model_path`` with every initializer's raw data of ``MIN_BYTES`` or more
    moved to ``data_name`` beside it; the bytes moved. Raises ``NotMovable``."""
    model_path = Path(model_path)
    with open(src, "rb") as f, open(model_path.with_name(data_name), "wb") as data:
        size = os.fstat(f.fileno()).st_size
        mover = _Mover(f, data, data_name)
        model = io.BytesIO()
        for field, wire, start, length in _fields(f, 0, size):
            if field == _MODEL_GRAPH and wire == _LEN:
                _emit_len(model, field, mover.graph(start, length))
            else:
                model.write(_raw_field(f, field, wire, start, length))
    model_path.write_bytes(model.getvalue())
    return mover.moved


class _Mover:
    def __init__(self, f, data, data_name: str):
        self.f, self.data, self.data_name, self.moved = f, data, data_name, 0

    def graph(self, start: int, length: int) -> bytes:
        out = io.BytesIO()
        for field, wire, s, n in _fields(self.f, start, start + length):
            if field == _GRAPH_INITIALIZER and wire == _LEN:
                _emit_len(out, field, self.tensor(s, n))
            else:
                out.write(_raw_field(self.f, field, wire, s, n))
        return out.getvalue()

    def tensor(self, start: int, length: int) -> bytes:
        """The TensorProto at ``start``, its raw data replaced by a reference to the data file."""
        out = io.BytesIO()
        for field, wire, s, n in _fields(self.f, start, start + length):
            if field == _TENSOR_DATA_LOCATION and wire == _VARINT and n == _EXTERNAL:
                raise NotMovable("it already keeps weights in an external data file")
            if field == _TENSOR_RAW_DATA and wire == _LEN and n >= MIN_BYTES:
                offset = self._copy(s, n)
                for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(n))):
                    entry = io.BytesIO()
                    _emit_len(entry, 1, key.encode())
                    _emit_len(entry, 2, value.encode())
                    _emit_len(out, _TENSOR_EXTERNAL_DATA, entry.getvalue())
                out.write(_varint_bytes(_TENSOR_DATA_LOCATION << 3 | _VARINT) + _varint_bytes(_EXTERNAL))
            else:
                out.write(_raw_field(self.f, field, wire, s, n))
        return out.getvalue()

    def _copy(self, start: int, length: int) -> int:
        self.data.write(b"\0" * (-self.data.tell() % ALIGN))
        offset = self.data.tell()
        self.f.seek(start)
        for done in range(0, length, _CHUNK):
            chunk = self.f.read(min(_CHUNK, length - done))
            if not chunk:
                raise NotMovable("the file ends inside a weight (truncated?)")
            self.data.write(chunk)
        self.moved += length
        return offset


def _fields(f, start: int, end: int):
    """(field number, wire type, payload start, payload length or varint value) of each field of the
    message in ``f`` from ``start`` to ``end``; ``f`` is left wherever the caller reads next."""
    pos = start
    while pos < end:
        f.seek(pos)
        tag, pos = _read_varint(f, pos)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise NotMovable("field number 0 (not a protobuf message)")
        if wire == _VARINT:
            value, pos = _read_varint(f, pos)
            yield field, wire, pos, value
            continue
        if wire == _LEN:
            length, pos = _read_varint(f, pos)
        elif wire in (_I64, _I32):
            length = 8 if wire == _I64 else 4
        else:
            raise NotMovable(f"wire type {wire} (not an ONNX protobuf)")
        if pos + length > end:
            raise NotMovable("a field runs past the end of its message (truncated?)")
        yield field, wire, pos, length
        pos += length


def _raw_field(f, field: int, wire: int, start: int, length: int) -> bytes:
    """The field re-encoded as read (for a varint, ``length`` is its value)."""
    tag = _varint_bytes(field << 3 | wire)
    if wire == _VARINT:
        return tag + _varint_bytes(length)
    f.seek(start)
    payload = f.read(length)
    if len(payload) != length:
        raise NotMovable("the file ends inside a field (truncated?)")
    return tag + (_varint_bytes(length) if wire == _LEN else b"") + payload


def _emit_len(out, field: int, payload: bytes) -> None:
    out.write(_varint_bytes(field << 3 | _LEN) + _varint_bytes(len(payload)) + payload)


def _read_varint(f, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise NotMovable("the file ends inside a varint (truncated?)")
        pos += 1
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise NotMovable("a varint longer than 10 bytes (not a protobuf)")


def _varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values are encoded as their two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)
