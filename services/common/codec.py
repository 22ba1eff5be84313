"""The one OIP tensor codec: numpy <-> Open Inference Protocol tensors, raw or typed."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from services.common.errors import TensorError


@dataclass(frozen=True)
class DataType:
    """One OIP datatype: its numpy dtype and the typed `*_contents` field (None: raw only)."""

    name: str
    dtype: np.dtype
    contents_field: str | None


_TABLE = [
    DataType("BOOL", np.dtype(np.bool_), "bool_contents"),
    DataType("UINT8", np.dtype(np.uint8), "uint_contents"),
    DataType("UINT16", np.dtype(np.uint16), "uint_contents"),
    DataType("UINT32", np.dtype(np.uint32), "uint_contents"),
    DataType("UINT64", np.dtype(np.uint64), "uint64_contents"),
    DataType("INT8", np.dtype(np.int8), "int_contents"),
    DataType("INT16", np.dtype(np.int16), "int_contents"),
    DataType("INT32", np.dtype(np.int32), "int_contents"),
    DataType("INT64", np.dtype(np.int64), "int64_contents"),
    DataType("FP16", np.dtype(np.float16), None),
    DataType("BF16", np.dtype(ml_dtypes.bfloat16), None),
    DataType("FP32", np.dtype(np.float32), "fp32_contents"),
    DataType("FP64", np.dtype(np.float64), "fp64_contents"),
    DataType("BYTES", np.dtype(np.object_), "bytes_contents"),
]
BY_NAME: dict[str, DataType] = {d.name: d for d in _TABLE}
BY_DTYPE: dict[np.dtype, DataType] = {d.dtype: d for d in _TABLE}
# ONNX tensor element type names (as onnxruntime reports them) -> OIP datatype.
ONNX_TO_OIP = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(bfloat16)": "BF16", "tensor(float)": "FP32",
    "tensor(double)": "FP64", "tensor(string)": "BYTES",
}
# Triton model_config DataType enum values (TYPE_BOOL=1 ...) by OIP datatype.
TRITON_TYPE = {
    "BOOL": 1, "UINT8": 2, "UINT16": 3, "UINT32": 4, "UINT64": 5, "INT8": 6, "INT16": 7,
    "INT32": 8, "INT64": 9, "FP16": 10, "FP32": 11, "FP64": 12, "BYTES": 13, "BF16": 14,
}


def datatype(name: str, tensor: str = "?") -> DataType:
    """Look up an OIP datatype by name, rejecting unknown names."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise TensorError(tensor, f"unknown datatype '{name}'") from None


def datatype_of(array: np.ndarray, tensor: str = "?") -> DataType:
    """The OIP datatype of a numpy array (unicode and bytes arrays map to BYTES)."""
    if array.dtype.kind in ("U", "S", "O"):
        return BY_NAME["BYTES"]
    try:
        return BY_DTYPE[array.dtype]
    except KeyError:
        raise TensorError(tensor, f"numpy dtype {array.dtype} has no OIP datatype") from None


def element_count(shape: tuple[int, ...] | list[int], tensor: str = "?") -> int:
    """Number of elements of a concrete shape; negative dimensions are refused."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise TensorError(tensor, f"shape {list(shape)} has a negative dimension")
        count *= dim
    return count


def _bytes_element(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.bytes_):
        return bytes(value)
    return str(value).encode("utf-8")


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor -> raw form: each element prefixed with its 4-byte little-endian length."""
    parts = []
    for item in array.reshape(-1):
        data = _bytes_element(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def shaped(array: np.ndarray, shape: list[int], tensor: str) -> np.ndarray:
    """`array` in `shape`; a shape numpy cannot make (a zero-size one with a huge dimension) is
    the client's error."""
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise TensorError(tensor, f"shape {list(shape)} cannot be made: {exc}") from None


def typed_array(values, dt: DataType, tensor: str, what: str) -> np.ndarray:
    """Numeric `values` as a 1-D array of `dt`; one out of its range (300 as UINT8, 2**70 as
    INT64, -1 as UINT32) is the client's error, never wrapped."""
    try:
        return np.asarray(values, dtype=dt.dtype)
    except (OverflowError, ValueError) as exc:  # numpy refuses, not wraps
        if isinstance(exc, OverflowError) and np.issubdtype(dt.dtype, np.integer):  # the range, in its words
            limits = np.iinfo(dt.dtype)
            raise TensorError(tensor, f"{what} holds a value out of range for {dt.name}, "
                                      f"{limits.min} to {limits.max}") from None
        raise TensorError(tensor, f"{what} holds a value out of range for {dt.name}: {exc}") from None


def deserialize_bytes(raw: bytes, count: int, tensor: str) -> np.ndarray:
    """Raw BYTES form -> 1-D object array of `count` bytes elements (read before anything of
    `count`'s size is made: a huge shape sent with a few bytes fails on the bytes)."""
    items: list[bytes] = []
    offset, view = 0, memoryview(raw)
    for i in range(count):
        if offset + 4 > len(raw):
            raise TensorError(tensor, f"raw BYTES data ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(tensor, f"raw BYTES element {i} claims {length} bytes past the end")
        items.append(bytes(view[offset:offset + length]))
        offset += length
    if offset != len(raw):
        raise TensorError(tensor, f"raw BYTES data has {len(raw) - offset} bytes beyond {count} elements")
    out = np.empty(count, dtype=np.object_)
    out[:] = items
    return out


def from_raw(raw: bytes, dtype_name: str, shape: list[int], tensor: str) -> np.ndarray:
    """Decode a raw tensor, checking its byte size against datatype and shape."""
    dt = datatype(dtype_name, tensor)
    count = element_count(shape, tensor)
    if dt.name == "BYTES":
        return shaped(deserialize_bytes(raw, count, tensor), shape, tensor)
    expected = count * dt.dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            tensor,
            f"raw data is {len(raw)} bytes but {dt.name} shape {list(shape)} needs {expected}",
        )
    return shaped(np.frombuffer(raw, dtype=dt.dtype), shape, tensor)


def to_raw(array: np.ndarray, tensor: str = "?") -> bytes:
    """Encode a numpy array to the OIP raw form."""
    dt = datatype_of(array, tensor)
    if dt.name == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=dt.dtype).tobytes()


def from_contents(contents, dtype_name: str, shape: list[int], tensor: str) -> np.ndarray:
    """Decode typed `InferTensorContents`, checking the element count against the shape."""
    dt = datatype(dtype_name, tensor)
    if dt.contents_field is None:
        raise TensorError(tensor, f"{dt.name} tensors must be sent in raw_input_contents")
    values = getattr(contents, dt.contents_field)
    count = element_count(shape, tensor)
    if len(values) != count:
        raise TensorError(
            tensor,
            f"{dt.contents_field} has {len(values)} elements but shape {list(shape)} needs {count}",
        )
    if dt.name == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return shaped(array, shape, tensor)
    return shaped(typed_array(values, dt, tensor, dt.contents_field), shape, tensor)


def to_contents(array: np.ndarray, contents, tensor: str = "?") -> None:
    """Fill typed `InferTensorContents` from a numpy array (raises for raw-only datatypes)."""
    dt = datatype_of(array, tensor)
    if dt.contents_field is None:
        raise TensorError(tensor, f"{dt.name} tensors can only travel raw")
    field = getattr(contents, dt.contents_field)
    if dt.name == "BYTES":
        field.extend(_bytes_element(v) for v in array.reshape(-1))
    else:
        field.extend(array.reshape(-1).tolist())
