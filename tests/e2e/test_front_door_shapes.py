"""The compiled front door and the shapes and parameters of what it is sent: a model without a
batch dimension (its first dimension is fixed like the others), a model with a text (BYTES)
output, one request over max_batch_size, and a timeout beyond what a clock holds. Each must get
the coordinator's answer, and never cost the other requests of its kind their route."""
from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
import tritonclient.utils as triton_utils
from onnx import TensorProto, helper

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec, SchedulerSpec
from services.common.registry_client import RegistryClient
from services.coordinator.door_process import BUILT
from services.models.digits import load_all
from tests.e2e.processes import answered_by_door, door_requests, put_deployment, start_door

pytestmark = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")


def _infer(client, model: str, x: np.ndarray, **kwargs):
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], client_timeout=30, **kwargs)


def _push(mesh, path: Path, name: str, metadata: dict) -> None:
    async def push():
        client = RegistryClient(mesh.registry)
        try:
            await client.push_file(path, name, "1", "FP32", metadata)
        finally:
            await client.close()
    asyncio.run(push())


def test_a_model_without_a_batch_dimension_is_routed_by_its_whole_shape(mesh, digits_models, tmp_path):
    """digits with a fixed [1, 64] input: a [2, 64] request must never reach a node (it would fail
    there, be counted against the node and take the route from the [1, 64] requests)."""
    name = "digits-fixed"
    fp32 = next(v for v in digits_models if v.precision == "FP32")
    model = onnx.load(fp32.path)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "fixed.onnx")
    _push(mesh, tmp_path / "fixed.onnx", name, dict(fp32.metadata))
    proc, address, metrics_port = start_door(mesh)
    x, y = load_all()
    client = triton.InferenceServerClient(address)
    try:
        assert client.get_model_config(name).config.max_batch_size == 0
        infra.wait_until(lambda: answered_by_door(_infer(client, name, x[:1])), 30, "the door serving [1, 64]")
        for _ in range(3):
            with pytest.raises(triton_utils.InferenceServerException, match=r"shape \[2, 64\]") as wrong:
                _infer(client, name, x[:2])
            assert wrong.value.status() == "StatusCode.INVALID_ARGUMENT"
        replies = [_infer(client, name, x[i:i + 1]) for i in range(10)]
        assert all(answered_by_door(r) for r in replies)  # the [1, 64] requests kept their route
        assert [int(r.as_numpy("probabilities").argmax()) for r in replies] == [int(v) for v in y[:10]]
        assert door_requests(metrics_port, name, "handed_over") == 0  # no node was ever sent a [2, 64] request
    finally:
        client.close()
        infra.stop(proc)


def test_a_text_output_comes_back_whole_to_each_caller_of_a_batch(mesh, tmp_path):
    """A BYTES output cannot be cut into rows by bytes (its elements have their own lengths): the
    door leaves such models to the coordinator, whose batches split by elements."""
    name = "digits-as-text"
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["label"], to=TensorProto.STRING)], name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("label", TensorProto.STRING, ["batch", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "text.onnx")
    _push(mesh, tmp_path / "text.onnx", name, {"max_batch_size": "64"})
    put_deployment(mesh, DeploymentSpec(model=name, batching=BatchingSpec(max_batch_size=64, max_queue_delay_us=200_000)))
    proc, address, _ = start_door(mesh)
    values = [1.0, 22.0, 333.0, 12345.0]
    try:
        def one(value: float):
            client = triton.InferenceServerClient(address)
            try:
                return _infer(client, name, np.array([[value]], np.float32))
            finally:
                client.close()
        for _ in range(3):  # the first round finds the route; the later ones would use it
            with concurrent.futures.ThreadPoolExecutor(len(values)) as pool:
                replies = list(pool.map(one, values))
            assert [r.as_numpy("label").tolist() for r in replies] == [[[b"1"]], [[b"22"]], [[b"333"]], [[b"12345"]]]
            assert not any(answered_by_door(r) for r in replies)
    finally:
        infra.stop(proc)


def test_one_request_over_max_batch_size_leaves_the_route_to_the_others(mesh):
    proc, address, _ = start_door(mesh, CNEI_COORDINATOR_ROUTE_TTL_MS="5000")  # a refusal would stay 5 s
    x, _ = load_all()
    client = triton.InferenceServerClient(address)
    try:
        with pytest.raises(triton_utils.InferenceServerException,
                           match="inference request batch-size must be <= 64 for 'digits'") as big:
            _infer(client, "digits", np.zeros((65, 64), np.float32), parameters={"precision": "FP16"})
        assert big.value.status() == "StatusCode.INVALID_ARGUMENT"
        infra.wait_until(lambda: answered_by_door(_infer(client, "digits", x[:1], parameters={"precision": "FP16"})), 3,
                         "the door serving the one-row requests within the route's 5 s")
    finally:
        client.close()
        infra.stop(proc)


def test_a_timeout_beyond_what_a_clock_holds_is_no_timeout(mesh):
    proc, address, _ = start_door(mesh)
    x, y = load_all()
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(lambda: answered_by_door(_infer(client, "digits", x[:1])), 30, "the door serving digits")
        for timeout in (10 ** 16, 2 ** 63 - 1):  # µs: past ~292 years the door's clock would wrap
            reply = _infer(client, "digits", x[:1], timeout=timeout)
            assert answered_by_door(reply) and int(reply.as_numpy("probabilities").argmax()) == int(y[0])
    finally:
        client.close()
        infra.stop(proc)


def test_a_node_that_stops_reading_fails_over_instead_of_holding_the_door(mesh, tmp_path):
    """A node stopped (SIGSTOP: its sockets still open, its receive windows shut) with 16 MB
    requests on their way: they fail over within seconds (the door's sends give up after a second
    without progress; the coordinator's health checks drop the node's routes), never wait on it."""
    import signal
    import time

    from tests.e2e.processes import start_fast_runtime

    name, width = "wide-sum", 4_000_000  # 16 MB a row: one batch in flight outgrows the socket buffers
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=1)], name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "wide.onnx")
    _push(mesh, tmp_path / "wide.onnx", name, {"max_batch_size": "4"})
    # placed by locality alone: its region's node, whatever the 8 MB requests do to its measured RTT
    put_deployment(mesh, DeploymentSpec(model=name, scheduler=SchedulerSpec(alpha=0, beta=1, gamma=0, delta=0,
                                                                            threshold=0.5)))
    runtime, _, _ = start_fast_runtime(mesh, "edge-stall", "site-stall", tmp_path, CNEI_RUNTIME_PRELOAD="")
    proc, address, _ = start_door(mesh)
    x = np.ones((1, width), np.float32)

    def one(_=None):
        client = triton.InferenceServerClient(address)
        try:
            reply = _infer(client, name, x, parameters={"region": "site-stall"})
            return (reply.get_response().parameters["cnei_node"].string_param, float(reply.as_numpy("total")[0, 0]),
                    answered_by_door(reply))
        finally:
            client.close()
    try:
        infra.wait_until(lambda: one()[::2] == ("edge-stall", True), 60, "the door serving the wide model on edge-stall")
        runtime.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(one, range(6)))
            took = time.monotonic() - started
        finally:
            runtime.send_signal(signal.SIGCONT)
        assert all(total == width for _, total, _ in answers)
        assert all(node != "edge-stall" for node, _, _ in answers), answers  # served elsewhere
        assert took < 25, took  # not the clients' 30 s timeout: nothing waited on the stopped node
    finally:
        infra.stop(proc)
        infra.stop(runtime)


def test_rows_past_every_preferred_size_leave_without_waiting_out_the_delay(mesh, digits_models, tmp_path):
    """Triton: once the queued rows are more than every preferred size, no preferred batch can be
    formed any more and the batch leaves; requests of 3 rows with a preferred size of 4 (6, 9, 12
    rows queued, never 4) used to wait out the whole queue delay."""
    import threading
    import time

    from services.common.deployment import BatchingSpec
    from tests.e2e.processes import push_digits_as

    model = push_digits_as(mesh, digits_models, "digits-preferred")
    put_deployment(mesh, DeploymentSpec(model=model, batching=BatchingSpec(
        max_batch_size=64, max_queue_delay_us=1_500_000, preferred_batch_sizes=(4,))))
    proc, address, _ = start_door(mesh)
    x, y = load_all()
    try:
        client = triton.InferenceServerClient(address)
        try:  # a request of exactly 4 rows leaves at once: the route with the rules is in place
            infra.wait_until(lambda: answered_by_door(_infer(client, model, x[:4])), 30, "the door serving the model")
        finally:
            client.close()
        out: list = [None] * 4
        start = threading.Barrier(4)

        def one(i: int) -> None:
            caller = triton.InferenceServerClient(address)
            try:
                start.wait()
                t0 = time.perf_counter()
                reply = _infer(caller, model, x[3 * i:3 * i + 3])
                out[i] = (time.perf_counter() - t0, answered_by_door(reply),
                          [int(v) for v in reply.as_numpy("probabilities").argmax(1)])
            finally:
                caller.close()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(o is not None and o[1] for o in out), out
        assert [v for o in out for v in o[2]] == [int(v) for v in y[:12]]
        assert max(seconds for seconds, _, _ in out) < 1.0, out  # not the 1.5 s delay
    finally:
        infra.stop(proc)


def test_shared_memory_regions_leave_no_descriptor_open_in_the_door(mesh):
    """The door opens a client's region for each request that uses it: regions registered,
    used and unregistered (names unique per client, as tritonclient's examples make them) never
    pile up open files in it (each one held a descriptor for good: the door ran out of them)."""
    import os
    import uuid

    import tritonclient.utils.shared_memory as shm

    from tests.e2e.processes import children

    proc, address, _ = start_door(mesh)
    x, _ = load_all()
    client = triton.InferenceServerClient(address)
    try:
        door_pid = next(p for p in children(proc.pid) if "frontdoor" in open(f"/proc/{p}/cmdline").read())
        infra.wait_until(lambda: answered_by_door(_infer(client, "digits", x[:1])), 30, "the door serving digits")

        def cycle() -> bool:
            name, key = f"fd-{uuid.uuid4().hex[:8]}", f"/cnei-e2e-fd-{uuid.uuid4().hex[:8]}"
            handle = shm.create_shared_memory_region(name, key, x[:1].nbytes)
            try:
                shm.set_shared_memory_region(handle, [x[:1].astype(np.float32)])
                client.register_system_shared_memory(name, key, x[:1].nbytes)
                tensor = triton.InferInput("input", [1, 64], "FP32")
                tensor.set_shared_memory(name, x[:1].nbytes)
                reply = client.infer("digits", [tensor], client_timeout=30)
                client.unregister_system_shared_memory(name)
                return answered_by_door(reply)
            finally:
                shm.destroy_shared_memory_region(handle)
        assert any([cycle() for _ in range(5)])  # the door reads regions itself
        before = len(os.listdir(f"/proc/{door_pid}/fd"))
        served = sum(cycle() for _ in range(40))
        assert served > 20
        assert len(os.listdir(f"/proc/{door_pid}/fd")) < before + 5
    finally:
        client.close()
        infra.stop(proc)


def test_a_client_sending_ever_new_shapes_cannot_fill_the_door_s_route_table(mesh, digits_models):
    """Every shape is a key of its own; refused ones route nothing and make room when the table
    (4,096 keys) is full, so a model asked for later still gets a route at the door."""
    from tests.e2e.processes import push_digits_as

    import grpc

    from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

    proc, address, _ = start_door(mesh)
    client = triton.InferenceServerClient(address)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        widths = range(65, 65 + 4200)  # [1, width] for a [-1, 64] model: refused, one key each
        for start in range(0, len(widths), 64):  # 64 in flight at a time
            calls = [_raw_infer(stub, np.zeros((1, width), np.float32)) for width in widths[start:start + 64]]
            for call in calls:
                assert isinstance(call.exception(), grpc.RpcError), call.result()
                assert call.exception().code() == grpc.StatusCode.INVALID_ARGUMENT, call.exception()
        later = push_digits_as(mesh, digits_models, "digits-after-many-shapes")
        x, _ = load_all()
        infra.wait_until(lambda: answered_by_door(_infer(client, later, x[:1])), 15, "the door serving a model asked for later")
    finally:
        channel.close()
        client.close()
        infra.stop(proc)


def _raw_infer(stub, x: np.ndarray, **hints: int):
    """digits through a plain stub: tritonclient refuses `triton_` parameters, which the
    coordinator ignores (client hints) but which make a key of their own at the door."""
    from services.pb.inference import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[x.astype(np.float32).tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    for name, value in hints.items():
        request.parameters[name].int64_param = value
    return stub.ModelInfer.future(request, timeout=30)


def _door_answer(reply, x: np.ndarray) -> tuple[bool, list[int]]:
    probabilities = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(len(x), -1)
    return reply.parameters["cnei_front_door"].bool_param, [int(v) for v in probabilities.argmax(1)]


def test_a_route_table_full_of_live_routes_sends_a_new_key_to_the_coordinator_and_keeps_serving_its_own(mesh):
    """4,096 keys (4,095 of them differing only in a client hint): the refused ones make room for
    a new key; once every key held routes, a new one takes the coordinator's path, answered
    right, and the keys held are still served by the door."""
    import grpc

    from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

    proc, address, _ = start_door(mesh)
    x, y = load_all()
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def send(keys: list[dict], rows: np.ndarray = x[:1]) -> list:
        replies = []
        for start in range(0, len(keys), 64):
            calls = [_raw_infer(stub, rows, **hints) for hints in keys[start:start + 64]]
            replies += [call.result() for call in calls]
        return replies

    try:
        infra.wait_until(lambda: _door_answer(send([{}])[0], x[:1])[0], 30, "the door serving digits")
        for width in range(65, 65 + 95):  # refused: they route nothing (and are settled long before they are let go of)
            with pytest.raises(grpc.RpcError) as wrong:
                _raw_infer(stub, np.zeros((1, width), np.float32)).result()
            assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        send([{"triton_key": n} for n in range(4000)])  # the table now holds 4,096 keys
        infra.wait_until(lambda: _door_answer(send([{"triton_key": -1}])[0], x[:1])[0], 15,
                         "a new key served by the door once the refused ones made room")
        send([{"triton_key": n} for n in range(4000, 4094)])  # full again, of keys that route
        for _ in range(3):
            assert _door_answer(send([{"triton_key": -2}], x[1:3])[0], x[1:3]) == (False, [int(v) for v in y[1:3]])
        infra.wait_until(lambda: _door_answer(send([{"triton_key": 7}])[0], x[:1])[0], 15, "a key held served by the door")
    finally:
        channel.close()
        infra.stop(proc)
