"""An edge runtime process against what clients may send it: BYTES tensors reach a string model
as their text, a shared memory object shrunk after registration is refused (and the runtime stays
up), fast-lane requests with malformed meta are answered INVALID_ARGUMENT, and ONNX Runtime
refusing a request's values is INVALID_ARGUMENT while a model failing at run time is INTERNAL. A registry and the
runtime of this module's own, against the session's NATS and Redis."""
from __future__ import annotations

import asyncio
import os
import socket
import uuid
from types import SimpleNamespace

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from services.cli import infra
from services.common import codec, fastlane
from services.common.registry_client import RegistryClient
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.processes import spawn, start_fast_runtime


def _save(path, nodes, inputs, outputs, initializers=()):
    model = helper.make_model(helper.make_graph(nodes, path.stem, inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _models(folder):
    """(string identity: STRING s [n, 1] -> o; add: FP32 a + b [n, 4] -> c; lookup: row `idx`
    [n] (INT64) of a table of 10 -> row [n, 1]; misshapen: x [n, 4] reshaped to [7], failing every
    run)."""
    strings = _save(folder / "strid.onnx", [helper.make_node("Identity", ["s"], ["o"])],
                    [helper.make_tensor_value_info("s", TensorProto.STRING, ["n", 1])],
                    [helper.make_tensor_value_info("o", TensorProto.STRING, ["n", 1])])
    add = _save(folder / "add2.onnx", [helper.make_node("Add", ["a", "b"], ["c"])],
                [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4]) for n in "ab"],
                [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", 4])])
    lookup = _save(folder / "lookup.onnx", [helper.make_node("Gather", ["table", "idx"], ["row"], axis=0)],
                   [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
                   [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["n", 1])],
                   [helper.make_tensor("table", TensorProto.FLOAT, [10, 1], [float(i) for i in range(10)])])
    misshapen = _save(folder / "misshapen.onnx", [helper.make_node("Reshape", ["x", "shape"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])],
                      [helper.make_tensor("shape", TensorProto.INT64, [1], [7])])
    # row `idx` - 20 of the same table: the zeros a load measures it with are out of range
    offset = _save(folder / "offset.onnx", [helper.make_node("Sub", ["idx", "twenty"], ["at"]),
                                            helper.make_node("Gather", ["table", "at"], ["row"], axis=0)],
                   [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
                   [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["n", 1])],
                   [helper.make_tensor("table", TensorProto.FLOAT, [10, 1], [float(i) for i in range(10)]),
                    helper.make_tensor("twenty", TensorProto.INT64, [], [20])])
    return strings, add, lookup, misshapen, offset


@pytest.fixture(scope="module")
def runtime(nats_server, redis_server, tmp_path_factory):
    """(runtime process, its gRPC address, its fast-lane address), models strid and add2 pushed."""
    tmp = tmp_path_factory.mktemp("runtime-robustness")
    port = infra.free_port()
    registry = spawn("services.registry", {
        **os.environ, "CNEI_REGISTRY_PORT": str(port), "CNEI_REGISTRY_METRICS_PORT": "0",
        "CNEI_REGISTRY_DATA_DIR": str(tmp / "reg"), "CNEI_REGISTRY_NATS_URL": nats_server}, port)
    procs = [registry]
    try:
        async def push():
            client = RegistryClient(f"127.0.0.1:{port}", timeout=30)
            try:
                for path in _models(tmp):
                    await client.push_file(path, path.stem, "1", "FP32")
            finally:
                await client.close()
        asyncio.run(push())
        mesh = SimpleNamespace(registry=f"127.0.0.1:{port}",
                               settings=SimpleNamespace(redis_url=redis_server, nats_url=nats_server))
        proc, address, fast = start_fast_runtime(mesh, f"edge-rr-{uuid.uuid4().hex[:6]}", "site-rr", tmp,
                                                 CNEI_RUNTIME_PRELOAD="", CNEI_RUNTIME_INTRA_OP_THREADS="1")
        procs.append(proc)
        yield proc, address, fast
    finally:
        for proc in reversed(procs):
            infra.stop(proc)


@pytest.fixture
def stub(runtime):
    with grpc.insecure_channel(runtime[1]) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_bytes_tensors_reach_a_string_model_as_their_text_raw_and_typed(stub):
    sent = np.array([[b"hello"], ["h\u00e9llo".encode()]], dtype=object)
    raw = pb.ModelInferRequest(model_name="strid")
    raw.inputs.add(name="s", datatype="BYTES", shape=[2, 1])
    raw.raw_input_contents.append(codec.to_raw(sent))
    reply = stub.ModelInfer(raw, timeout=30)
    assert codec.from_raw(reply.raw_output_contents[0], "BYTES", [2, 1], "o").tolist() == sent.tolist()
    typed = pb.ModelInferRequest(model_name="strid")
    typed.inputs.add(name="s", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"world")
    assert list(stub.ModelInfer(typed, timeout=30).outputs[0].contents.bytes_contents) == [b"world"]


def test_bytes_that_are_not_utf_8_are_refused_naming_the_input(stub):
    request = pb.ModelInferRequest(model_name="strid")
    request.inputs.add(name="s", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"\xff\xfe")
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 's': element 0 is not UTF-8" in refused.value.details()


def _lookup(*indices: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="lookup")
    request.inputs.add(name="idx", datatype="INT64", shape=[len(indices)]).contents.int64_contents.extend(indices)
    return request


def test_an_index_onnx_runtime_finds_out_of_range_is_invalid_argument_saying_so(stub):
    reply = stub.ModelInfer(_lookup(3, 9), timeout=30)
    assert list(reply.outputs[0].contents.fp32_contents) == [3.0, 9.0]  # typed, as the request was
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(_lookup(1, 42), timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "indices element out of data bounds, idx=42 must be within the inclusive range [-10,9]" \
        in refused.value.details()


def test_a_model_whose_load_measurement_fails_on_zeros_still_loads_and_serves_real_inputs(stub):
    """Measuring on load runs the model on zero-filled inputs: a model that refuses those (here
    an index out of range) is served unmeasured, not failed (which told the client its own request
    was INVALID_ARGUMENT)."""
    request = _lookup(25, 29)
    request.model_name = "offset"
    reply = stub.ModelInfer(request, timeout=30)
    assert list(reply.outputs[0].contents.fp32_contents) == [5.0, 9.0]


def test_a_model_that_fails_at_run_time_is_internal_naming_why(stub):
    request = pb.ModelInferRequest(model_name="misshapen")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(np.ones((2, 4), np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(request, timeout=30)
    assert failed.value.code() is grpc.StatusCode.INTERNAL
    assert "The input tensor cannot be reshaped to the requested shape" in failed.value.details()


def _from_shm(region: str, offset: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add2")
    for name in "ab":
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        tensor.parameters["shared_memory_region"].string_param = region
        tensor.parameters["shared_memory_byte_size"].int64_param = 16
        tensor.parameters["shared_memory_offset"].int64_param = offset
    return request


def test_a_shared_memory_object_shrunk_after_registration_is_refused_and_the_runtime_stays_up(runtime, stub):
    key = f"cnei-e2e-shrunk-{uuid.uuid4().hex[:10]}"
    path = f"/dev/shm/{key}"
    with open(path, "wb") as f:
        f.write(np.ones(4096, np.float32).tobytes())  # 16 KiB
    region = f"shrunk-{key}"
    try:
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name=region, key=f"/{key}", offset=0, byte_size=16384), timeout=10)
        reply = stub.ModelInfer(_from_shm(region, 8192), timeout=30)
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [2.0] * 4
        os.truncate(path, 4096)  # the client shrinks its object: same inode, still registered
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(_from_shm(region, 8192), timeout=30)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"shared memory region '{region}' is smaller than the range asked for" in refused.value.details()
        assert runtime[0].poll() is None
        reply = stub.ModelInfer(_from_shm(region, 0), timeout=30)  # what the object still holds serves
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [2.0] * 4
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=region), timeout=10)
        os.unlink(path)


def _add_payload() -> bytes:
    request = pb.ModelInferRequest(model_name="add2")
    for name in "ab":
        request.inputs.add(name=name, datatype="FP32", shape=[1, 4])
    request.raw_input_contents.extend([np.ones((1, 4), np.float32).tobytes()] * 2)
    return request.SerializeToString()


def _exchange(sock: socket.socket, frame: bytes) -> tuple[int, int, bytes, bytes]:
    sock.sendall(frame)
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "little"):
        chunk = sock.recv(65536)
        assert chunk, "the runtime closed the connection without answering"
        data += chunk
    _, request_id, kind, meta_len = fastlane.HEADER.unpack_from(data)
    body = data[fastlane.HEADER.size:]
    return request_id, kind, body[:meta_len], body[meta_len:]


@pytest.mark.parametrize("meta", [b"not json", b"[]", b'{"trace": 5}', b'{"timeout": "x"}'],
                         ids=["not-json", "a-list", "trace-a-number", "timeout-a-string"])
def test_fast_lane_requests_with_malformed_meta_are_answered_invalid_argument(runtime, meta):
    host, port = runtime[2].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        request_id, kind, code, message = _exchange(sock, fastlane.encode(5, fastlane.REQUEST, meta, _add_payload()))
        assert (request_id, kind, code) == (5, fastlane.ERROR, b"INVALID_ARGUMENT")
        assert message.startswith(b"fast-lane request meta")
        request_id, kind, _, reply = _exchange(sock, fastlane.encode(6, fastlane.REQUEST, b'{"timeout": 5}',
                                                                     _add_payload()))
        assert (request_id, kind) == (6, fastlane.REPLY)
        assert pb.ModelInferResponse.FromString(reply).outputs[0].name == "c"
