"""A minimal reader of TensorFlow ``GraphDef`` files (frozen ``.pb`` graphs), without TensorFlow.

Only what weight conversion needs is decoded: each node's name, op, inputs and attributes, and the
tensors held by ``Const`` nodes (dtype, shape, values). The protobuf wire format is parsed directly
(varints, length-delimited fields, fixed32/fixed64); field numbers follow TensorFlow's public ``.proto``
definitions:

- ``GraphDef``: ``node = 1`` (repeated ``NodeDef``); other fields (library, versions) are skipped.
- ``NodeDef``: ``name = 1``, ``op = 2``, ``input = 3`` (repeated), ``device = 4``,
  ``attr = 5`` (map<string, AttrValue>: entries with ``key = 1``, ``value = 2``).
- ``AttrValue``: ``list = 1``, ``s = 2``, ``i = 3``, ``f = 4``, ``b = 5``, ``type = 6``, ``shape = 7``,
  ``tensor = 8`` (``placeholder`` and ``func`` are kept undecoded).
- ``AttrValue.ListValue``: ``s = 2``, ``i = 3``, ``f = 4``, ``b = 5``, ``type = 6``, ``shape = 7``,
  ``tensor = 8`` (numeric lists may be packed or not).
- ``TensorShapeProto``: ``dim = 2`` (each ``size = 1``, ``name = 2``), ``unknown_rank = 3``.
- ``TensorProto``: ``dtype = 1``, ``tensor_shape = 2``, ``tensor_content = 4`` (raw little-endian
  bytes), or typed value lists ``float_val = 5``, ``double_val = 6``, ``int_val = 7``,
  ``string_val = 8``, ``int64_val = 10``, ``bool_val = 11``, ``half_val = 13``. As in TensorFlow, a
  value list shorter than the shape is padded with its last value (a single value fills the tensor).

Malformed input raises :class:`GraphDefError` naming the byte offset (and the node, where known).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# TensorFlow DataType enum values -> numpy dtypes (the ones a frozen vision graph uses).
DTYPES: dict[int, np.dtype[np.generic]] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
DT_STRING = 7

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class GraphDefError(ValueError):
    """The bytes are not a GraphDef this reader understands."""


@dataclass(frozen=True)
class TensorShape:
    dims: tuple[int, ...]
    unknown_rank: bool = False


@dataclass(frozen=True)
class Tensor:
    """A decoded ``TensorProto``: ``dtype`` is the TensorFlow enum value; ``value`` the numpy array."""

    dtype: int
    shape: tuple[int, ...]
    value: np.ndarray


AttrScalar = bytes | int | float | bool | TensorShape | Tensor | None
AttrValue = AttrScalar | list[AttrScalar]


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    device: str = ""
    attrs: dict[str, AttrValue] = field(default_factory=dict)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise GraphDefError(f"truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise GraphDefError(f"varint longer than 10 bytes at byte {pos}")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: memoryview) -> list[tuple[int, int, int | memoryview]]:
    """All (field number, wire type, value) of one message; LEN values are sub-views, not copies."""
    out: list[tuple[int, int, int | memoryview]] = []
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise GraphDefError(f"field number 0 at byte {pos}")
        value: int | memoryview
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise GraphDefError(f"length-delimited field {number} overruns its message at byte {pos}")
            value = buf[pos : pos + length]
            pos += length
        elif wire == _FIXED64:
            if pos + 8 > end:
                raise GraphDefError(f"truncated fixed64 at byte {pos}")
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == _FIXED32:
            if pos + 4 > end:
                raise GraphDefError(f"truncated fixed32 at byte {pos}")
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise GraphDefError(f"unsupported wire type {wire} for field {number} at byte {pos}")
        out.append((number, wire, value))
    return out


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise GraphDefError("expected a string field, got a number")
    return bytes(value).decode("utf-8")


def _number(value: int | memoryview) -> int:
    if isinstance(value, memoryview):
        raise GraphDefError("expected a number, got a length-delimited field")
    return value


def _raw(value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise GraphDefError("expected a length-delimited field, got a number")
    return value


def _varints(wire: int, value: int | memoryview) -> list[int]:
    """A repeated varint field occurrence, packed (LEN) or not."""
    if wire == _VARINT:
        return [_signed64(_number(value))]
    buf = _raw(value)
    out: list[int] = []
    pos = 0
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(_signed64(v))
    return out


def _fixed(wire: int, value: int | memoryview, fmt: str) -> list[float]:
    """A repeated float/double field occurrence, packed (LEN) or not."""
    if wire == _LEN:
        buf = bytes(_raw(value))
        size = struct.calcsize("<" + fmt)
        if len(buf) % size:
            raise GraphDefError(f"packed {fmt!r} field of {len(buf)} bytes")
        return [float(x) for x in struct.unpack(f"<{len(buf) // size}{fmt}", buf)]
    size = 4 if wire == _FIXED32 else 8
    return [float(struct.unpack("<" + fmt, _number(value).to_bytes(size, "little"))[0])]


def parse_shape(buf: memoryview) -> TensorShape:
    dims: list[int] = []
    unknown = False
    for number, wire, value in _fields(buf):
        if number == 2:
            size = 0
            for n2, _w2, v2 in _fields(_raw(value)):
                if n2 == 1:
                    size = _signed64(_number(v2))
            dims.append(size)
        elif number == 3 and wire == _VARINT:
            unknown = bool(value)
    return TensorShape(tuple(dims), unknown)


def parse_tensor(buf: memoryview) -> Tensor:
    dtype = 0
    shape = TensorShape(())
    content: bytes | None = None
    floats: list[float] = []
    ints: list[int] = []
    strings: list[bytes] = []
    for number, wire, value in _fields(buf):
        if number == 1:
            dtype = _number(value)
        elif number == 2:
            shape = parse_shape(_raw(value))
        elif number == 4:
            content = bytes(_raw(value))
        elif number == 5:
            floats += _fixed(wire, value, "f")
        elif number == 6:
            floats += _fixed(wire, value, "d")
        elif number in (7, 10, 11, 13):  # int_val, int64_val, bool_val, half_val (bit patterns)
            ints += _varints(wire, value)
        elif number == 8:
            strings.append(bytes(_raw(value)))
    dims = shape.dims
    if any(d < 0 for d in dims):
        raise GraphDefError(f"tensor with unknown dimensions {dims}")
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if dtype == DT_STRING:
        text = np.empty(len(strings), dtype=object)
        text[:] = strings
        return Tensor(dtype, dims, text)
    if dtype not in DTYPES:
        raise GraphDefError(f"unsupported tensor dtype {dtype}")
    np_dtype = DTYPES[dtype]
    arr: np.ndarray
    if content:
        if len(content) != count * np_dtype.itemsize:
            raise GraphDefError(
                f"tensor_content has {len(content)} bytes, shape {dims} of {np_dtype} needs {count * np_dtype.itemsize}"
            )
        arr = np.frombuffer(content, dtype=np_dtype).reshape(dims).copy()
    else:
        if floats and ints:
            raise GraphDefError("tensor has both float and integer values")
        n_values = len(floats) + len(ints)
        if n_values > count:
            raise GraphDefError(f"tensor has {n_values} values for shape {dims}")
        flat: np.ndarray
        if dtype == 19:  # half_val holds the 16-bit patterns
            flat = np.array(ints, dtype=np.uint16).view(np_dtype)
        else:
            flat = np.array(floats or ints, dtype=np_dtype)
        if count and flat.size == 0:
            flat = np.zeros(1, dtype=np_dtype)
        if flat.size < count:
            flat = np.concatenate([flat, np.full(count - flat.size, flat[-1], dtype=np_dtype)])
        arr = flat.reshape(dims)
    return Tensor(dtype, dims, arr.astype(np_dtype.newbyteorder("="), copy=False))


def _list_value(buf: memoryview) -> list[AttrScalar]:
    out: list[AttrScalar] = []
    for number, wire, value in _fields(buf):
        if number == 2:
            out.append(bytes(_raw(value)))
        elif number in (3, 6):
            out += _varints(wire, value)
        elif number == 4:
            out += _fixed(wire, value, "f")
        elif number == 5:
            out += [bool(v) for v in _varints(wire, value)]
        elif number == 7:
            out.append(parse_shape(_raw(value)))
        elif number == 8:
            out.append(parse_tensor(_raw(value)))
    return out


def parse_attr(buf: memoryview) -> AttrValue:
    result: AttrValue = None
    for number, wire, value in _fields(buf):
        if number == 1:
            result = _list_value(_raw(value))
        elif number == 2:
            result = bytes(_raw(value))
        elif number in (3, 6):
            result = _varints(wire, value)[0]
        elif number == 4:
            result = _fixed(wire, value, "f")[0]
        elif number == 5:
            result = bool(value)
        elif number == 7:
            result = parse_shape(_raw(value))
        elif number == 8:
            result = parse_tensor(_raw(value))
    return result


def parse_node(buf: memoryview) -> Node:
    node = Node(name="", op="")
    raw_attrs: list[memoryview] = []
    for number, _wire, value in _fields(buf):
        if number == 1:
            node.name = _text(value)
        elif number == 2:
            node.op = _text(value)
        elif number == 3:
            node.inputs.append(_text(value))
        elif number == 4:
            node.device = _text(value)
        elif number == 5:
            raw_attrs.append(_raw(value))
    for entry in raw_attrs:
        key = ""
        attr: AttrValue = None
        try:
            for n2, _w2, v2 in _fields(entry):
                if n2 == 1:
                    key = _text(v2)
                elif n2 == 2:
                    attr = parse_attr(_raw(v2))
        except GraphDefError as exc:
            raise GraphDefError(f"node {node.name!r} ({node.op}): attribute {key!r}: {exc}") from exc
        node.attrs[key] = attr
    return node


def parse_graphdef(data: bytes) -> list[Node]:
    """The nodes of a serialised ``GraphDef``, in file order."""
    buf = memoryview(data)
    nodes: list[Node] = []
    for number, _wire, value in _fields(buf):
        if number == 1:
            nodes.append(parse_node(_raw(value)))
    if not nodes:
        raise GraphDefError("no nodes found; not a GraphDef")
    return nodes


def read_graphdef(path: Path) -> list[Node]:
    try:
        return parse_graphdef(path.read_bytes())
    except GraphDefError as exc:
        raise GraphDefError(f"{path}: {exc}") from exc


def const_tensors(nodes: list[Node]) -> dict[str, np.ndarray]:
    """The value of every ``Const`` node by node name."""
    out: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.op == "Const":
            value = node.attrs.get("value")
            if not isinstance(value, Tensor):
                raise GraphDefError(f"Const node {node.name!r} has no tensor value")
            out[node.name] = value.value
    return out
