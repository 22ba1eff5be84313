"""Read an ONNX file's graph inputs, outputs and initializer names from its protobuf wire format,
skipping every tensor's data (the file is mapped, the weights' pages never touched)."""
from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 5, 11, 12
_TENSOR_NAME = 8
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class GraphSignature:
    """The graph's declared inputs and outputs, and the names of its initializers."""
    inputs: list[onnx.ValueInfoProto]
    outputs: list[onnx.ValueInfoProto]
    initializer_names: set[str]


def _varint(buf, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, value start, value end) of each field of the message in buf[start:end]; the
    value of a length-delimited field is its payload."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == _VARINT:
            after = _varint(buf, pos)[1]
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(buf, pos)
            after = pos + length
        elif wire in (_FIXED64, _FIXED32):
            after = pos + (8 if wire == _FIXED64 else 4)
        else:
            raise ValueError(f"unexpected wire type {wire}")
        if after > end:
            raise ValueError("truncated message")
        yield key >> 3, pos, after
        pos = after


def _tensor_name(buf, start: int, end: int) -> str:
    name = b""
    for number, value_start, value_end in _fields(buf, start, end):
        if number == _TENSOR_NAME:
            name = buf[value_start:value_end]
    return name.decode()


def _read(buf, size: int) -> GraphSignature:
    signature = GraphSignature([], [], set())
    for number, graph_start, graph_end in _fields(buf, 0, size):
        if number != _MODEL_GRAPH:
            continue
        for field, start, end in _fields(buf, graph_start, graph_end):
            if field == _GRAPH_INITIALIZER:
                signature.initializer_names.add(_tensor_name(buf, start, end))
            elif field in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                values = signature.inputs if field == _GRAPH_INPUT else signature.outputs
                values.append(onnx.ValueInfoProto.FromString(buf[start:end]))
    return signature


def read_graph_signature(path: Path) -> GraphSignature:
    """The graph signature of the ONNX model at `path`; ValueError if it is not one."""
    with path.open("rb") as fh:
        size = path.stat().st_size
        if size == 0:
            raise ValueError("empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read(buf, size)
