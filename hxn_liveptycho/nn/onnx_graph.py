"""Read an ONNX model's graph and weights without the ``onnx`` package.

The PyTorch runtime must run the shipped graph on machines where only
PyTorch and ONNX Runtime are installed (ONNX Runtime cannot hand out a
model's weights, and the ``onnx`` package is not a dependency). An ONNX file
is a protocol-buffer message, and the few fields a runtime needs (nodes,
their attributes, initializers, graph inputs and outputs, opsets) decode
with a small wire-format reader. Anything the reader does not understand
(external data, sparse initializers, subgraphs) is refused by name rather
than guessed at.

Field numbers are those of ``onnx/onnx.proto`` (IR version 3 onwards).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.errors import ConfigurationError

__all__ = ["OnnxGraph", "OnnxNode", "load_graph"]

#: TensorProto.DataType -> NumPy dtype (the ones a vision graph uses).
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    9: np.dtype(np.bool_),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
}

# Wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message; LEN values stay memoryviews."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _I64:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == _I32:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ConfigurationError(f"unsupported protobuf wire type {wire} (field {number})")
        yield number, wire, value


def _packed_varints(value: Any, wire: int) -> list[int]:
    if wire == _VARINT:
        return [_signed64(value)]
    out, pos, buf = [], 0, value
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(_signed64(v))
    return out


def _packed_floats(value: Any, wire: int) -> list[float]:
    data = bytes(value)
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8")


def _tensor(buf: memoryview) -> tuple[str, np.ndarray]:
    """A TensorProto as (name, array)."""
    name, dims, dtype_code = "", [], 1
    raw: bytes | None = None
    typed: dict[int, list[Any]] = {}
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _packed_varints(value, wire)
        elif number == 2:
            dtype_code = value
        elif number == 8:
            name = _text(value)
        elif number == 9:
            raw = bytes(value)
        elif number == 4:
            typed.setdefault(4, []).extend(_packed_floats(value, wire))
        elif number in (5, 7):
            typed.setdefault(number, []).extend(_packed_varints(value, wire))
        elif number == 10:
            data = bytes(value)
            typed.setdefault(10, []).extend(struct.unpack(f"<{len(data) // 8}d", data))
        elif number in (13, 14) and (number == 13 or value == 1):
            raise ConfigurationError(f"tensor {name or '?'} keeps its data outside the file")
    dtype = _DTYPES.get(dtype_code)
    if dtype is None:
        raise ConfigurationError(f"tensor {name!r} has unsupported data type {dtype_code}")
    shape = tuple(int(d) for d in dims)
    if raw is not None:
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    elif 4 in typed:
        array = np.asarray(typed[4], dtype=dtype)
    elif 10 in typed:
        array = np.asarray(typed[10], dtype=dtype)
    elif 7 in typed:
        array = np.asarray(typed[7], dtype=dtype)
    elif 5 in typed:
        # int32_data carries int32, int16, int8, uint8, bool and (as bits) float16.
        ints = np.asarray(typed[5], dtype=np.int64)
        array = ints.astype(np.uint16).view(np.float16) if dtype == np.float16 else ints
        array = array.astype(dtype)
    else:
        array = np.zeros(0, dtype=dtype)
    return name, array.reshape(shape)


def _attribute(buf: memoryview) -> tuple[str, Any]:
    name = ""
    value: Any = None
    floats: list[float] = []
    ints: list[int] = []
    strings: list[str] = []
    for number, wire, raw in _fields(buf):
        if number == 1:
            name = _text(raw)
        elif number == 2:
            value = struct.unpack("<f", bytes(raw))[0]
        elif number == 3:
            value = _signed64(raw)
        elif number == 4:
            value = bytes(raw)
        elif number == 5:
            value = _tensor(raw)[1]
        elif number == 7:
            floats += _packed_floats(raw, wire) if wire == _LEN else [struct.unpack("<f", raw)[0]]
        elif number == 8:
            ints += _packed_varints(raw, wire)
        elif number == 9:
            strings.append(_text(raw))
        elif number in (6, 10, 11, 22, 23):
            raise ConfigurationError(f"attribute {name!r}: subgraphs and tensor lists unsupported")
    if value is None:
        value = floats or ints or strings or []
    return name, value


def _value_info(buf: memoryview) -> tuple[str, tuple[int | str | None, ...]]:
    name: str = ""
    shape: tuple[int | str | None, ...] = ()
    for number, _, value in _fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:  # TypeProto
            for n2, _, tensor_type in _fields(value):
                if n2 != 1:
                    continue
                for n3, _, shape_proto in _fields(tensor_type):
                    if n3 != 2:
                        continue
                    dims: list[int | str | None] = []
                    for n4, _, dim in _fields(shape_proto):
                        if n4 != 1:
                            continue
                        entry: int | str | None = None
                        for n5, _, v in _fields(dim):
                            entry = int(v) if n5 == 1 else _text(v) if n5 == 2 else entry
                        dims.append(entry)
                    shape = tuple(dims)
    return name, shape


@dataclass
class OnnxNode:
    """One operator: what it reads, what it writes, and its attributes."""

    op_type: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, Any] = field(default_factory=dict)
    domain: str = ""
    name: str = ""


@dataclass
class OnnxGraph:
    """A model's main graph: nodes in topological order, weights, and I/O shapes."""

    nodes: list[OnnxNode]
    initializers: dict[str, np.ndarray]
    inputs: dict[str, tuple[int | str | None, ...]]
    outputs: dict[str, tuple[int | str | None, ...]]
    opsets: dict[str, int]

    @property
    def op_types(self) -> set[str]:
        return {n.op_type for n in self.nodes}


def _node(buf: memoryview) -> OnnxNode:
    node = OnnxNode("", [], [])
    for number, _, value in _fields(buf):
        if number == 1:
            node.inputs.append(_text(value))
        elif number == 2:
            node.outputs.append(_text(value))
        elif number == 3:
            node.name = _text(value)
        elif number == 4:
            node.op_type = _text(value)
        elif number == 7:
            node.domain = _text(value)
        elif number == 5:
            key, attr = _attribute(value)
            node.attributes[key] = attr
    return node


def parse_model(data: bytes) -> OnnxGraph:
    """The main graph of a serialized ModelProto."""
    buf = memoryview(data)
    graph_buf: memoryview | None = None
    opsets: dict[str, int] = {}
    for number, _, value in _fields(buf):
        if number == 7:
            graph_buf = value
        elif number == 8:
            domain, version = "", 0
            for n2, _, v in _fields(value):
                domain = _text(v) if n2 == 1 else domain
                version = int(v) if n2 == 2 else version
            opsets[domain] = version
    if graph_buf is None:
        raise ConfigurationError("the file holds no ONNX graph")
    nodes: list[OnnxNode] = []
    initializers: dict[str, np.ndarray] = {}
    inputs: dict[str, tuple[int | str | None, ...]] = {}
    outputs: dict[str, tuple[int | str | None, ...]] = {}
    for number, _, value in _fields(graph_buf):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            name, array = _tensor(value)
            initializers[name] = array
        elif number == 15:
            raise ConfigurationError("sparse initializers are not supported")
        elif number == 11:
            name, shape = _value_info(value)
            inputs[name] = shape
        elif number == 12:
            name, shape = _value_info(value)
            outputs[name] = shape
    # Older exporters list the initializers among the graph inputs too.
    inputs = {k: v for k, v in inputs.items() if k not in initializers}
    return OnnxGraph(nodes, initializers, inputs, outputs, opsets)


def load_graph(path: Path) -> OnnxGraph:
    """The graph of the ONNX file at ``path``."""
    return parse_model(Path(path).read_bytes())
