"""OIP REST v2 JSON <-> domain conversion."""
from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest

from services.common import codec, oip, oip_json
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
                 id="42", parameters={"priority": 2}, outputs=[{"name": "y"}])
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
         TensorError, "tensor 'x': 'shape' must be a list of non-negative integers"),
        (_body({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}),
         TensorError, r"tensor 'x': 'data' has 3 elements but shape \[2, 2\] needs 4"),
        (_body({"name": "x", "datatype": "INT32", "shape": [1], "data": ["seven"]}),
         TensorError, "tensor 'x': 'data' of INT32 must hold JSON integers, not \"seven\""),
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


def _one(datatype: str, shape, data, **extra) -> dict:
    return _body({"name": "x", "datatype": datatype, "shape": shape, "data": data}, **extra)


@pytest.mark.parametrize(("datatype", "value"), [
    ("INT8", 300), ("INT8", -129), ("UINT8", -1), ("UINT8", 256), ("UINT32", 2**32), ("INT64", 2**70),
    ("UINT64", 2**64), ("UINT64", -1), ("FP32", 10**400),
], ids=lambda v: v if isinstance(v, str) else str(v) if abs(v) < 2**80 else "huge")
def test_a_json_number_out_of_its_datatype_s_range_is_refused_naming_the_tensor(datatype, value):
    with pytest.raises(TensorError, match=f"tensor 'x': 'data' holds a value out of range for {datatype}") as info:
        oip_json.request_from_json("m", "", _one(datatype, [2], [0, value]))
    if datatype != "FP32":  # the range in the datatype's words, not numpy's or Python's
        limits = np.iinfo(codec.datatype(datatype).dtype)
        assert info.value.message.endswith(f"out of range for {datatype}, {limits.min} to {limits.max}")


def test_the_extremes_of_each_integer_datatype_are_taken():
    got = oip_json.request_from_json("m", "", _one("UINT64", [2], [0, 2**64 - 1])).inputs["x"]
    assert got.tolist() == [0, 2**64 - 1]
    got = oip_json.request_from_json("m", "", _one("INT8", [2], [-128, 127])).inputs["x"]
    assert got.tolist() == [-128, 127]


@pytest.mark.parametrize("shape", [[0, 2**62], [2**62, 0], [0, 2**70]])
def test_a_zero_size_shape_numpy_cannot_make_is_the_client_s_error(shape):
    with pytest.raises(TensorError, match=r"tensor 'x': shape .* cannot be made"):
        oip_json.request_from_json("m", "", _one("FP32", shape, []))


@pytest.mark.parametrize("shape", [[True, 2], [1.0, 2], [-1, 2], ["1", 2], None])
def test_a_shape_of_anything_but_non_negative_integers_is_refused(shape):
    with pytest.raises(TensorError, match="'shape' must be a list of non-negative integers"):
        oip_json.request_from_json("m", "", _one("FP32", shape, [0, 0]))


@pytest.mark.parametrize(("outputs", "shown"), [(None, "null"), (5, "5"), ({"name": "y"}, '{"name": "y"}')])
def test_requested_outputs_that_are_not_a_list_are_refused(outputs, shown):
    with pytest.raises(InvalidArgument, match=f"'outputs' must be a JSON array of requested outputs, not {shown}"):
        oip_json.request_from_json("m", "", _one("FP32", [1], [1.0], outputs=outputs))


@pytest.mark.parametrize(("datatype", "data", "shown"), [
    ("BYTES", [5], "5"), ("BYTES", [True], "true"), ("BYTES", [None], "null"),
    ("FP32", ["1.5"], '"1.5"'), ("FP32", [True], "true"), ("FP32", [None], "null"), ("FP64", [[1.0, {"a": 1}]], '{"a": 1}'),
    ("INT32", [1.5], "1.5"), ("INT64", [1.0], "1.0"), ("UINT8", [False], "false"),
    ("BOOL", [1], "1"), ("BOOL", ["true"], '"true"'),
])
def test_json_elements_of_the_wrong_type_for_the_datatype_are_refused_not_converted(datatype, data, shown):
    kind = {"BYTES": "strings", "BOOL": "booleans", "FP32": "numbers", "FP64": "numbers"}.get(datatype, "integers")
    shape = [len(oip_json._flatten(data))]
    with pytest.raises(TensorError, match=f"'data' of {datatype} must hold JSON {kind}, not {re.escape(shown)}"):
        oip_json.request_from_json("m", "", _one(datatype, shape, data))


def test_a_json_bytes_element_given_as_a_number_allocates_nothing():
    # bytes(2**40) would ask for a terabyte of zeros before anything else is looked at
    with pytest.raises(TensorError, match="must hold JSON strings"):
        oip_json.request_from_json("m", "", _one("BYTES", [1], [2**40]))


def test_float_datatypes_take_json_integers_and_the_nan_and_infinity_tokens():
    got = oip_json.request_from_json("m", "", _one("FP32", [4], [1, 2.5, float("nan"), float("-inf")])).inputs["x"]
    assert got[:2].tolist() == [1.0, 2.5] and np.isnan(got[2]) and got[3] == -np.inf


def test_data_must_be_a_json_array():
    with pytest.raises(TensorError, match="'data' must be a JSON array, not 5"):
        oip_json.request_from_json("m", "", _one("FP32", [1], 5))


def test_data_nested_deeper_than_python_recurses_is_flattened():
    data: list = [1.0]
    for _ in range(5000):
        data = [data]
    assert oip_json.request_from_json("m", "", _one("FP32", [1], data)).inputs["x"].tolist() == [1.0]


@pytest.mark.parametrize(("extra", "message"), [
    ({"parameters": {"binary_data_output": "false"}}, "request: parameter 'binary_data_output' must be true or false"),
    ({"outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]},
     "output 'y': parameter 'binary_data' must be true or false"),
    ({"outputs": [{"name": "y", "parameters": {"binary_data": 0}}]}, "parameter 'binary_data' must be true or false"),
    ({"id": 7}, "'id' must be a JSON string, not 7"),
    ({"id": {"a": 1}}, "'id' must be a JSON string"),
    ({"parameters": {"foo": 2**70}}, "request: parameter 'foo' must be a string, boolean, number or 64-bit integer"),
    ({"parameters": {"foo": None}}, "parameter 'foo' must be a string"),
    ({"parameters": {"foo": [1]}}, "parameter 'foo' must be a string"),
    ({"outputs": [{"name": "y", "parameters": {"classification": "3"}}]},
     "output 'y': parameter 'classification' must be a non-negative integer"),
])
def test_request_fields_of_the_wrong_json_type_are_refused_not_converted(extra, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        oip_json.infer_from_json("m", "", _one("FP32", [1], [1.0], **extra))


def test_boolean_binary_flags_and_string_ids_are_taken():
    decoded = oip_json.infer_from_json("m", "", _one("FP32", [1], [1.0], id="r1", parameters={
        "binary_data_output": False, "priority": 2**63 - 1}, outputs=[{"name": "y", "parameters": {"binary_data": True}}]))
    assert decoded.request.id == "r1" and decoded.binary_outputs == {"y"} and not decoded.binary_default
    assert decoded.request.parameters == {"priority": 2**63 - 1}


def test_non_finite_outputs_are_written_as_strict_json_strings():
    outputs = {"y": np.array([1.5, np.nan, np.inf, -np.inf], np.float32),
               "h": np.array([np.nan, 0.5], np.float16)}
    resp = oip.InferResponse(model_name="m", outputs=outputs, parameters={"score": float("nan")})
    text = oip_json.dumps(oip_json.response_to_json(resp))
    body = json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in the reply"))
    assert body["outputs"][0]["data"] == [1.5, "NaN", "Infinity", "-Infinity"]
    assert body["outputs"][1]["data"] == ["NaN", 0.5]
    assert body["parameters"] == {"score": "NaN"}
    read_back = np.array(body["outputs"][0]["data"], dtype=np.float32)  # as tritonclient's as_numpy does
    np.testing.assert_array_equal(read_back, outputs["y"])


def test_strict_dumps_refuses_a_bare_nan():
    with pytest.raises(ValueError):
        oip_json.dumps({"x": float("nan")})


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


def test_a_response_to_a_request_without_an_id_has_no_id_field():
    resp = oip.InferResponse(model_name="digits", outputs={"y": np.zeros(1, np.float32)}, model_version="1")
    assert "id" not in oip_json.response_to_json(resp)


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


# --- Triton's binary tensor data extension ----------------------------------------------------
def test_binary_inputs_are_taken_from_the_section_after_the_json_header_in_input_order():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1, 2]], np.int64)
    body = {"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": a.nbytes}},
        {"name": "j", "datatype": "INT32", "shape": [2], "data": [5, 6]},
        {"name": "b", "datatype": "INT64", "shape": [1, 2], "parameters": {"binary_data_size": b.nbytes}}]}
    req = oip_json.request_from_json("m", "", body, a.tobytes() + b.tobytes())
    np.testing.assert_array_equal(req.inputs["a"], a)
    np.testing.assert_array_equal(req.inputs["b"], b)
    np.testing.assert_array_equal(req.inputs["j"], [5, 6])


@pytest.mark.parametrize(("binary", "message"), [
    (b"\0" * 30, "6 bytes of binary data are not claimed"),
    (b"\0" * 20, "'binary_data_size' is 24 but only 20 bytes"),
])
def test_binary_sections_that_do_not_add_up_are_refused(binary, message):
    body = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}]}
    with pytest.raises(InvalidArgument, match=message):
        oip_json.request_from_json("m", "", body, binary)


def test_outputs_asked_for_in_binary_follow_the_json_header():
    y, z = np.linspace(0, 1, 4, dtype=np.float32), np.array([b"ab", b"c"], dtype=np.object_)
    resp = oip.InferResponse("m", {"y": y, "z": z}, model_version="1")
    everything = oip_json.infer_from_json("m", "", {"inputs": [], "parameters": {"binary_data_output": True}})
    assert "binary_data_output" not in everything.request.parameters  # a REST matter, not the model's
    body, length = oip_json.response_to_json(resp, everything)
    header = json.loads(body[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [16, 4 + 2 + 4 + 1]  # BYTES: each element length-prefixed
    assert body[length:length + 16] == y.tobytes() and "data" not in header["outputs"][0]

    one = oip_json.infer_from_json("m", "", {"inputs": [], "outputs": [
        {"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]})
    body, length = oip_json.response_to_json(resp, one)
    header = json.loads(body[:length])
    assert header["outputs"][1]["data"] == ["ab", "c"] and body[length:] == y.tobytes()

    plain = oip_json.infer_from_json("m", "", {"inputs": [], "outputs": [{"name": "y"}]})
    assert oip_json.response_to_json(resp, plain)["outputs"][0]["data"] == pytest.approx(y.tolist())


def test_tensors_in_shared_memory_over_rest(tmp_path):
    from services.common.shm import SharedMemoryRegions
    key = f"/cnei-test-rest-{os.getpid()}"
    with open(f"/dev/shm{key}", "wb") as f:
        f.truncate(256)
    regions = SharedMemoryRegions()
    try:
        regions.register("r", key, 0, 256)
        x = np.arange(4, dtype=np.float32)
        with open(f"/dev/shm{key}", "r+b") as f:
            f.write(x.tobytes())
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {
            "shared_memory_region": "r", "shared_memory_byte_size": 16}}],
            "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 64,
                                                     "shared_memory_offset": 128}}]}
        decoded = oip_json.infer_from_json("m", "", body, b"", regions)
        np.testing.assert_array_equal(decoded.request.inputs["x"], x)
        out = oip_json.response_to_json(oip.InferResponse("m", {"y": x * 2}), decoded, regions)
        assert out["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [4]}]
        with open(f"/dev/shm{key}", "rb") as f:
            assert f.read()[128:144] == (x * 2).tobytes()
        with pytest.raises(InvalidArgument, match="does not take tensors in shared memory"):
            oip_json.request_from_json("m", "", body)
    finally:
        regions.close()
        os.unlink(f"/dev/shm{key}")


def test_proto_messages_are_written_as_tritons_http_api_writes_them():
    from services.common.deployment import DeploymentSpec
    from services.common.model_spec import ModelVariant, TensorSpec
    from services.common.oip_convert import config_to_proto

    def config(input_shape: tuple, deployment: DeploymentSpec | None = DeploymentSpec(model="m")) -> dict:
        variant = ModelVariant(name="m", version="1", precision="FP32", sha256="0" * 64, size_bytes=1,
                               inputs=[TensorSpec("x", "FP32", input_shape)], outputs=[TensorSpec("y", "FP32", (-1, 10))],
                               metadata={"max_batch_size": "8"})
        return oip_json.proto_to_json(config_to_proto(variant, deployment).config)

    batching = config((-1, 64))
    assert batching["max_batch_size"] == 8 and batching["input"][0]["dims"] == [64]  # numbers, not strings
    assert batching["input"][0]["data_type"] == "TYPE_FP32" and "dynamic_batching" in batching
    assert batching["parameters"]["max_batch_size"] == {"string_value": "8"}
    fixed = config((1, 64))
    assert fixed["max_batch_size"] == 0 and "dynamic_batching" not in fixed  # a default is still written
    unbatched_server = config((-1, 64), deployment=None)  # takes batches, forms none
    assert unbatched_server["max_batch_size"] == 8 and "dynamic_batching" not in unbatched_server


def test_a_loaded_variant_s_config_names_its_instance_kind_and_session_threads():
    from services.common.model_spec import ModelVariant, TensorSpec
    from services.common.oip_convert import config_to_proto
    from services.common.oip_operations import Instance

    variant = ModelVariant(name="m", version="1", precision="FP32", sha256="0" * 64, size_bytes=1,
                           inputs=[TensorSpec("x", "FP32", (-1, 64))], outputs=[TensorSpec("y", "FP32", (-1, 10))])
    on_cpu = oip_json.proto_to_json(config_to_proto(variant, instance=Instance(gpu=False, intra_op_threads=2)).config)
    assert on_cpu["instance_group"][0]["kind"] == "KIND_CPU"
    assert on_cpu["parameters"]["intra_op_thread_count"] == {"string_value": "2"}
    on_gpu = oip_json.proto_to_json(config_to_proto(variant, instance=Instance(gpu=True, intra_op_threads=1)).config)
    assert on_gpu["instance_group"][0]["kind"] == "KIND_GPU"
    assert "intra_op_thread_count" not in on_gpu.get("parameters", {})
    not_loaded = oip_json.proto_to_json(config_to_proto(variant).config)
    assert not_loaded["instance_group"][0]["kind"] == "KIND_CPU"
    assert "intra_op_thread_count" not in not_loaded.get("parameters", {})
