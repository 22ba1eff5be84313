"""OIP REST v2 JSON <-> domain conversion."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from services.common import oip, oip_json
from services.common.errors import InvalidArgument, TensorError


def _body(*inputs: dict, **extra) -> dict:
    return {"inputs": list(inputs), **extra}


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "expected"),
    [
        ("FP32", [2, 2], [[1.0, 2.0], [3.0, 4.5]], np.array([[1, 2], [3, 4.5]], np.float32)),
        ("INT64", [3], [1, -2, 3], np.array([1, -2, 3], np.int64)),
        ("UINT8", [1, 3], [0, 128, 255], np.array([[0, 128, 255]], np.uint8)),
        ("BOOL", [2], [True, False], np.array([True, False])),
        ("FP16", [1], [0.5], np.array([0.5], np.float16)),
        ("BF16", [2], [1.0, -2.0], np.array([1.0, -2.0], ml_dtypes.bfloat16)),
        ("FP64", [2, 1], [1e-300, 2.0], np.array([[1e-300], [2.0]], np.float64)),
    ],
)
def test_a_json_input_becomes_a_numpy_array_of_its_datatype_and_shape(datatype, shape, data, expected):
    body = _body({"name": "x", "datatype": datatype, "shape": shape, "data": data})
    got = oip_json.request_from_json("m", "1", body).inputs["x"]
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_json_bytes_inputs_become_utf8_bytes_elements():
    body = _body({"name": "s", "datatype": "BYTES", "shape": [2], "data": ["hi", "\u00e9"]})
    got = oip_json.request_from_json("m", "", body).inputs["s"]
    assert got.dtype == np.object_
    assert list(got) == [b"hi", b"\xc3\xa9"]


def test_a_json_request_keeps_model_id_parameters_and_requested_outputs():
    body = _body({"name": "x", "datatype": "INT32", "shape": [1], "data": [7]},
                 id=42, parameters={"priority": 2}, outputs=[{"name": "y"}])
    req = oip_json.request_from_json("digits", "3", body)
    assert (req.model_name, req.model_version, req.id) == ("digits", "3", "42")
    assert req.parameters == {"priority": 2}
    assert req.outputs == ["y"]


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ([], InvalidArgument, "request body must be a JSON object with an 'inputs' list"),
        ({"inputs": {}}, InvalidArgument, "'inputs' list"),
        (_body("x"), InvalidArgument, "each input must be a JSON object"),
        (_body({"datatype": "FP32", "shape": [1], "data": [1]}), InvalidArgument, "input without a 'name'"),
        (_body({"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}),
         TensorError, "tensor 'x': unknown datatype 'FP8'"),
        (_body({"name": "x", "datatype": "FP32", "shape": "1", "data": [1]}),
         TensorError, "tensor 'x': 'shape' must be a list of integers"),
        (_body({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}),
         TensorError, r"tensor 'x': 'data' has 3 elements but shape \[2, 2\] needs 4"),
        (_body({"name": "x", "datatype": "INT32", "shape": [1], "data": ["seven"]}),
         TensorError, "tensor 'x': 'data' does not fit INT32"),
        (_body(*[{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}] * 2),
         TensorError, "tensor 'x': appears twice in the request"),
        (_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, parameters=[1]),
         InvalidArgument, "'parameters' must be a JSON object"),
    ],
    ids=["body-not-object", "inputs-not-list", "input-not-object", "no-name", "unknown-datatype",
         "shape-not-list", "data-count", "data-type", "duplicate", "parameters-not-object"],
)
def test_a_malformed_json_request_is_rejected_with_a_readable_message(body, error, message):
    with pytest.raises(error, match=message):
        oip_json.request_from_json("m", "", body)


def test_a_response_becomes_json_with_datatype_shape_and_flat_data():
    outputs = {"probabilities": np.array([[0.25, 0.75]], np.float32), "label": np.array([1], np.int64)}
    resp = oip.InferResponse(model_name="digits", outputs=outputs, model_version="1", id="r",
                             parameters={"node": "edge-1"})
    body = oip_json.response_to_json(resp)
    assert json.loads(json.dumps(body)) == {
        "model_name": "digits", "model_version": "1", "id": "r", "parameters": {"node": "edge-1"},
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
            {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]},
        ],
    }


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_outputs_become_json_numbers(dtype):
    resp = oip.InferResponse(model_name="m", outputs={"h": np.array([0.5, -2.0], dtype)})
    out = json.loads(json.dumps(oip_json.response_to_json(resp)))["outputs"][0]
    assert out["data"] == [0.5, -2.0]
    assert out["datatype"] == ("FP16" if dtype is np.float16 else "BF16")


@pytest.mark.parametrize(
    "array",
    [np.array([b"ok", b"\xc3\xa9"], dtype=np.object_), np.array(["ok", "\u00e9"])],
    ids=["object-bytes", "unicode"],
)
def test_bytes_outputs_become_json_strings(array):
    resp = oip.InferResponse(model_name="m", outputs={"s": array})
    out = json.loads(json.dumps(oip_json.response_to_json(resp)))["outputs"][0]
    assert out == {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["ok", "\u00e9"]}
