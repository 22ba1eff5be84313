"""Validate an ONNX artifact and read its input/output signature, holding at most one copy of it
in memory (the checker's, from the file; the signature is read off the file's wire format)."""
from __future__ import annotations

from pathlib import Path

import onnx

from services.common.errors import InvalidArgument
from services.common.model_spec import TensorSpec
from services.registry.onnx_wire import read_graph_signature

_ELEM_TO_OIP = {
    onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16", onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64", onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16", onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64", onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16", onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64", onnx.TensorProto.STRING: "BYTES",
}


def _spec(value_info) -> TensorSpec:
    tensor = value_info.type.tensor_type
    dtype = _ELEM_TO_OIP.get(tensor.elem_type)
    if dtype is None:
        raise InvalidArgument(f"ONNX tensor '{value_info.name}' has unsupported element type")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(value_info.name, dtype, dims)


def inspect_onnx(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Run the ONNX checker (full check) and return (inputs, outputs); INVALID_ARGUMENT if bad."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        graph = read_graph_signature(path)
    except Exception as exc:  # noqa: BLE001 - any parse/check failure means a bad artifact
        raise InvalidArgument(f"artifact is not a valid ONNX model: {exc}") from None
    inputs = [_spec(v) for v in graph.inputs if v.name not in graph.initializer_names]
    outputs = [_spec(v) for v in graph.outputs]
    if not inputs or not outputs:
        raise InvalidArgument("ONNX model must declare graph inputs and outputs")
    return inputs, outputs
