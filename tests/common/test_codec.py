"""The OIP tensor codec and the request/response conversions built on it."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from services.common import codec, oip
from services.common.errors import InvalidArgument, TensorError
from services.pb.inference import grpc_service_pb2 as pb


def _bytes_array(*items: bytes) -> np.ndarray:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = list(items)
    return array


# One sample per OIP datatype, with the extremes of its range and a non-trivial shape.
SAMPLES = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([0, 1, 255], np.uint8),
    "UINT16": np.array([[0, 65535]], np.uint16),
    "UINT32": np.array([0, 7, 2**32 - 1], np.uint32),
    "UINT64": np.array([0, 2**64 - 1], np.uint64),
    "INT8": np.array([[-128], [0], [127]], np.int8),
    "INT16": np.array([-32768, 0, 32767], np.int16),
    "INT32": np.array([-(2**31), 0, 2**31 - 1], np.int32),
    "INT64": np.array([[-(2**63), 2**63 - 1]], np.int64),
    "FP16": np.array([-1.5, 0.0, 65504.0], np.float16),
    "BF16": np.array([[1.5, -2.0], [3.0e38, 0.0]], ml_dtypes.bfloat16),
    "FP32": np.array([[np.pi, -0.5], [3.4e38, 1e-30]], np.float32),
    "FP64": np.array([np.pi, -1e300, 1e-300], np.float64),
    "BYTES": _bytes_array(b"", b"a", "h\u00e9llo".encode(), b"\x00\xff").reshape(2, 2),
}
ALL = sorted(SAMPLES)
RAW_ONLY = ["BF16", "FP16"]
TYPED = [name for name in ALL if name not in RAW_ONLY]


def assert_same_tensor(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert np.array_equal(got, want)


def test_the_sample_table_covers_every_oip_datatype():
    assert set(SAMPLES) == set(codec.BY_NAME)
    assert all(codec.datatype_of(a).name == name for name, a in SAMPLES.items())


@pytest.mark.parametrize("name", ALL)
def test_every_datatype_survives_a_raw_request_round_trip(name):
    sent = oip.InferRequest(model_name="m", inputs={"x": SAMPLES[name]})
    msg = oip.request_to_proto(sent)
    assert msg.inputs[0].datatype == name
    assert list(msg.inputs[0].shape) == list(SAMPLES[name].shape)
    assert len(msg.raw_input_contents) == 1
    got = oip.request_from_proto(pb.ModelInferRequest.FromString(msg.SerializeToString()))
    assert got.raw is True
    assert_same_tensor(got.inputs["x"], SAMPLES[name])


@pytest.mark.parametrize("name", TYPED)
def test_every_typed_datatype_survives_a_typed_request_round_trip(name):
    sent = oip.InferRequest(model_name="m", inputs={"x": SAMPLES[name]}, raw=False)
    msg = oip.request_to_proto(sent)
    assert not msg.raw_input_contents
    assert msg.inputs[0].contents.ListFields(), "typed contents were not filled"
    got = oip.request_from_proto(pb.ModelInferRequest.FromString(msg.SerializeToString()))
    assert got.raw is False
    assert_same_tensor(got.inputs["x"], SAMPLES[name])


@pytest.mark.parametrize("name", ALL)
def test_every_datatype_survives_a_raw_response_round_trip(name):
    sent = oip.InferResponse(model_name="m", outputs={"y": SAMPLES[name]})
    msg = oip.response_to_proto(sent, raw=True)
    assert msg.outputs[0].datatype == name
    assert len(msg.raw_output_contents) == 1
    got = oip.response_from_proto(pb.ModelInferResponse.FromString(msg.SerializeToString()))
    assert_same_tensor(got.outputs["y"], SAMPLES[name])


@pytest.mark.parametrize("name", TYPED)
def test_every_typed_datatype_survives_a_typed_response_round_trip(name):
    msg = oip.response_to_proto(oip.InferResponse(model_name="m", outputs={"y": SAMPLES[name]}), raw=False)
    assert not msg.raw_output_contents
    got = oip.response_from_proto(pb.ModelInferResponse.FromString(msg.SerializeToString()))
    assert_same_tensor(got.outputs["y"], SAMPLES[name])


@pytest.mark.parametrize("name", RAW_ONLY)
def test_half_precision_inputs_cannot_travel_as_typed_contents(name):
    request = oip.InferRequest(model_name="m", inputs={"half": SAMPLES[name]}, raw=False)
    with pytest.raises(TensorError, match=f"tensor 'half': {name} tensors can only travel raw"):
        oip.request_to_proto(request)


@pytest.mark.parametrize("name", RAW_ONLY)
def test_half_precision_typed_contents_are_refused_when_decoding(name):
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="half", datatype=name, shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(TensorError, match=f"tensor 'half': {name} tensors must be sent in raw"):
        oip.request_from_proto(msg)


@pytest.mark.parametrize("name", RAW_ONLY)
def test_a_typed_response_with_a_half_precision_output_is_sent_raw_instead(name):
    outputs = {"y": SAMPLES[name], "z": SAMPLES["INT32"]}
    msg = oip.response_to_proto(oip.InferResponse(model_name="m", outputs=outputs), raw=False)
    assert len(msg.raw_output_contents) == 2
    got = oip.response_from_proto(msg)
    assert_same_tensor(got.outputs["y"], SAMPLES[name])
    assert_same_tensor(got.outputs["z"], SAMPLES["INT32"])


@pytest.mark.parametrize("name", [n for n in ALL if n != "BYTES"])
def test_raw_form_of_a_fixed_size_datatype_is_the_little_endian_element_bytes(name):
    array = SAMPLES[name]
    little = array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder != "|" else array
    assert codec.to_raw(array) == np.ascontiguousarray(little).tobytes()
    assert len(codec.to_raw(array)) == array.size * array.dtype.itemsize


@pytest.mark.parametrize(
    ("items", "raw"),
    [
        ([b"ab", b"", b"xyz"], b"\x02\x00\x00\x00ab" b"\x00\x00\x00\x00" b"\x03\x00\x00\x00xyz"),
        (["\u00e9"], b"\x02\x00\x00\x00\xc3\xa9"),
        ([b"q" * 300], b"\x2c\x01\x00\x00" + b"q" * 300),
        ([b"\x00" * 65536], b"\x00\x00\x01\x00" + b"\x00" * 65536),
    ],
    ids=["three-elements", "utf8-text", "300-bytes", "64-KiB"],
)
def test_bytes_raw_form_prefixes_each_element_with_its_4_byte_little_endian_length(items, raw):
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    assert codec.to_raw(array) == raw
    decoded = codec.from_raw(raw, "BYTES", [len(items)], "t")
    assert list(decoded) == [i.encode() if isinstance(i, str) else i for i in items]


def test_a_unicode_numpy_array_travels_as_utf8_bytes():
    msg = oip.request_to_proto(oip.InferRequest(model_name="m", inputs={"s": np.array(["a", "\u00fc"])}))
    assert msg.inputs[0].datatype == "BYTES"
    got = oip.request_from_proto(msg).inputs["s"]
    assert list(got) == [b"a", "\u00fc".encode()]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\x02\x00\x00", "ends before element 0 of 2"),
        (b"\x01\x00\x00\x00a", "ends before element 1 of 2"),
        (b"\x01\x00\x00\x00a\x09\x00\x00\x00abc", "element 1 claims 9 bytes past the end"),
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00bEXTRA", "5 bytes beyond 2 elements"),
    ],
    ids=["short-prefix", "missing-element", "overlong-length", "trailing-bytes"],
)
def test_malformed_raw_bytes_data_is_rejected_naming_the_tensor(raw, problem):
    with pytest.raises(TensorError, match=f"tensor 'words': raw BYTES .*{problem}") as info:
        codec.from_raw(raw, "BYTES", [2], "words")
    assert info.value.tensor == "words"


@pytest.mark.parametrize(
    ("datatype", "shape", "size", "needs"),
    [("FP32", [2, 2], 12, 16), ("INT64", [3], 16, 24), ("UINT8", [4], 5, 4),
     ("BF16", [2], 2, 4), ("BOOL", [1, 3], 0, 3)],
)
def test_raw_data_of_the_wrong_size_for_its_shape_is_rejected_naming_the_tensor(datatype, shape, size, needs):
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="pixels", datatype=datatype, shape=shape)
    msg.raw_input_contents.append(b"\x00" * size)
    with pytest.raises(TensorError, match=f"tensor 'pixels': raw data is {size} bytes but .* needs {needs}"):
        oip.request_from_proto(msg)


@pytest.mark.parametrize(
    ("datatype", "field", "values", "shape"),
    [("FP32", "fp32_contents", [1.0, 2.0, 3.0], [2, 2]), ("INT32", "int_contents", [1], [1, 2]),
     ("BYTES", "bytes_contents", [b"a", b"b"], [1]), ("UINT64", "uint64_contents", [], [1])],
)
def test_typed_contents_whose_count_differs_from_the_shape_are_rejected_naming_the_tensor(
    datatype, field, values, shape
):
    msg = pb.ModelInferRequest(model_name="m")
    getattr(msg.inputs.add(name="features", datatype=datatype, shape=shape).contents, field).extend(values)
    with pytest.raises(TensorError, match=f"tensor 'features': {field} has {len(values)} elements"):
        oip.request_from_proto(msg)


def test_a_response_whose_typed_contents_do_not_fit_its_shape_is_rejected():
    msg = pb.ModelInferResponse(model_name="m")
    msg.outputs.add(name="scores", datatype="FP64", shape=[3]).contents.fp64_contents.extend([1.0])
    with pytest.raises(TensorError, match="tensor 'scores'"):
        oip.response_from_proto(msg)


def test_a_raw_input_contents_count_that_differs_from_the_inputs_is_rejected():
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="a", datatype="UINT8", shape=[1])
    msg.inputs.add(name="b", datatype="UINT8", shape=[1])
    msg.raw_input_contents.append(b"\x01")
    with pytest.raises(InvalidArgument, match="raw_input_contents has 1 entries but the request has 2 inputs"):
        oip.request_from_proto(msg)


def test_an_input_with_typed_contents_beside_raw_input_contents_is_rejected_in_triton_s_words():
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="a", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    msg.raw_input_contents.append(np.float32(2.0).tobytes())
    with pytest.raises(InvalidArgument, match="contents field must not be specified when using raw_input_contents "
                                              "for 'a' for model 'm'"):
        oip.request_from_proto(msg)


@pytest.mark.parametrize("raw_count", [1, 3])
def test_a_raw_output_contents_count_that_differs_from_the_outputs_is_rejected(raw_count):
    msg = pb.ModelInferResponse(model_name="m")
    msg.outputs.add(name="a", datatype="UINT8", shape=[1])
    msg.outputs.add(name="b", datatype="UINT8", shape=[1])
    msg.raw_output_contents.extend([b"\x01"] * raw_count)
    with pytest.raises(InvalidArgument, match=f"raw_output_contents has {raw_count} entries"):
        oip.response_from_proto(msg)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_an_unknown_datatype_is_rejected_naming_the_tensor(raw):
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="odd", datatype="FP8", shape=[1])
    if raw:
        msg.raw_input_contents.append(b"\x00")
    with pytest.raises(TensorError, match="tensor 'odd': unknown datatype 'FP8'"):
        oip.request_from_proto(msg)


def test_a_numpy_dtype_without_an_oip_datatype_is_rejected_naming_the_tensor():
    request = oip.InferRequest(model_name="m", inputs={"z": np.zeros(2, np.complex64)})
    with pytest.raises(TensorError, match="tensor 'z': numpy dtype complex64 has no OIP datatype"):
        oip.request_to_proto(request)


@pytest.mark.parametrize(
    ("decode", "message"),
    [
        (lambda: codec.from_contents(pb.InferTensorContents(uint_contents=[300]), "UINT8", [1], "t"),
         "tensor 't': uint_contents holds a value out of range for UINT8"),
        (lambda: codec.from_contents(pb.InferTensorContents(int_contents=[-1000]), "INT8", [1], "t"),
         "tensor 't': int_contents holds a value out of range for INT8"),
        (lambda: codec.from_raw(b"", "FP32", [0, 2 ** 62], "t"), r"tensor 't': shape \[0, 4611686018427387904\] cannot be made"),
        (lambda: codec.from_raw(b"", "BYTES", [0, 2 ** 62], "t"), r"tensor 't': shape \[0, 4611686018427387904\] cannot be made"),
        (lambda: codec.from_raw(b"\0\0\0\0", "BYTES", [2 ** 40], "t"),
         "tensor 't': raw BYTES data ends before element 1 of 1099511627776"),
    ],
    ids=["uint8-out-of-range", "int8-out-of-range", "zero-size-huge-dimension", "bytes-zero-size-huge-dimension",
         "bytes-count-beyond-the-data"],
)
def test_values_and_shapes_numpy_cannot_hold_are_the_clients_error(decode, message):
    """Never an OverflowError, a MemoryError (an 8 TiB allocation for 4 bytes sent) or numpy's
    ValueError, which would answer INTERNAL."""
    with pytest.raises(TensorError, match=message):
        decode()


def test_a_negative_dimension_is_rejected_naming_the_tensor():
    with pytest.raises(TensorError, match=r"tensor 't': shape \[-1, 2\] has a negative dimension"):
        codec.from_raw(b"", "FP32", [-1, 2], "t")


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda m: setattr(m, "model_name", ""), InvalidArgument, "model_name is required"),
        (lambda m: m.inputs.add(datatype="FP32", shape=[0]), InvalidArgument, "input 0 has no name"),
        (lambda m: [m.inputs.add(name="x", datatype="FP32", shape=[0]) for _ in range(2)],
         TensorError, "tensor 'x': appears twice in the request"),
    ],
    ids=["no-model-name", "unnamed-input", "duplicate-input"],
)
def test_a_malformed_request_is_rejected_with_a_readable_message(build, error, message):
    msg = pb.ModelInferRequest(model_name="m")
    build(msg)
    with pytest.raises(error, match=message):
        oip.request_from_proto(msg)


def test_request_identity_parameters_and_requested_outputs_survive_a_round_trip():
    params = {"flag": True, "count": 3, "ratio": 0.25, "tag": "edge"}
    sent = oip.InferRequest(model_name="digits", model_version="2", id="req-7", parameters=params,
                            inputs={"x": SAMPLES["FP32"]}, outputs=["probabilities"])
    got = oip.request_from_proto(oip.request_to_proto(sent))
    assert (got.model_name, got.model_version, got.id) == ("digits", "2", "req-7")
    assert got.parameters == params
    assert type(got.parameters["count"]) is int and type(got.parameters["flag"]) is bool
    assert got.outputs == ["probabilities"]


def test_response_identity_and_parameters_survive_a_round_trip():
    sent = oip.InferResponse(model_name="digits", model_version="1", id="r1",
                             parameters={"node": "edge-1", "cached": False}, outputs={})
    got = oip.response_from_proto(oip.response_to_proto(sent))
    assert (got.model_name, got.model_version, got.id) == ("digits", "1", "r1")
    assert got.parameters == {"node": "edge-1", "cached": False}
    assert got.outputs == {}
