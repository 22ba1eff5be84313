"""The compiled front door and a request the node refuses for its own values (a Gather index out
of range: INVALID_ARGUMENT from ONNX Runtime): only that request fails, with the node's error; the
valid requests batched with it are answered by the door, and the route stays."""
from __future__ import annotations

import asyncio
import concurrent.futures
import re

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
import tritonclient.utils as triton_utils
from onnx import TensorProto, helper

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec
from services.common.registry_client import RegistryClient
from services.coordinator.door_process import BUILT
from tests.e2e.processes import answered_by_door, door_requests, put_deployment, start_door

pytestmark = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")

MODEL = "door-lookup"
ROUNDS = 3
VALID = [1, 2, 3, 4, 5, 6]  # indices within the table of 10
BAD = 50


def _lookup_model(path) -> None:
    """row `idx` [n] (INT64) of a table of 10 holding 0..9 -> row [n, 1]."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["row"], axis=0)], MODEL,
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor("table", TensorProto.FLOAT, [10, 1], [float(i) for i in range(10)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)


def _push(mesh, path) -> None:
    async def push():
        client = RegistryClient(mesh.registry)
        try:
            await client.push_file(path, MODEL, "1", "FP32", {"max_batch_size": "64"})
        finally:
            await client.close()
    asyncio.run(push())


def _infer(address: str, index: int):
    client = triton.InferenceServerClient(address)
    try:
        tensor = triton.InferInput("idx", [1], "INT64")
        tensor.set_data_from_numpy(np.array([index], np.int64))
        return client.infer(MODEL, [tensor], client_timeout=30)
    finally:
        client.close()


@pytest.fixture(scope="module")
def lookup(mesh, tmp_path_factory):
    """The lookup model pushed and batched (200 ms queue delay)."""
    path = tmp_path_factory.mktemp("door-lookup") / "lookup.onnx"
    _lookup_model(path)
    _push(mesh, path)
    put_deployment(mesh, DeploymentSpec(model=MODEL, batching=BatchingSpec(max_batch_size=64,
                                                                           max_queue_delay_us=200_000)))
    return mesh


@pytest.fixture
def door(lookup):
    """A coordinator behind its door, serving the lookup model on a route: (address, metrics port)."""
    proc, address, metrics_port = start_door(lookup)
    try:
        infra.wait_until(lambda: answered_by_door(_infer(address, 0)), 30, "the door serving the lookup model")
        yield address, metrics_port
    finally:
        infra.stop(proc)


def _round(address: str):
    """The valid indices and one bad one at once (one batch): (valid replies, the bad one's error)."""
    def one(index: int):
        try:
            return _infer(address, index)
        except triton_utils.InferenceServerException as exc:
            return exc
    with concurrent.futures.ThreadPoolExecutor(len(VALID) + 1) as pool:
        answers = list(pool.map(one, [*VALID[:3], BAD, *VALID[3:]]))
    return answers[:3] + answers[4:], answers[3]


def test_a_bad_request_batched_with_valid_ones_fails_alone_and_keeps_the_route(door):
    address, metrics_port = door
    for _ in range(ROUNDS):
        valid, bad = _round(address)
        assert isinstance(bad, triton_utils.InferenceServerException)
        assert bad.status() == "StatusCode.INVALID_ARGUMENT"
        assert re.search(r"out of (data )?bounds|out of range", bad.message()), bad.message()
        assert [float(r.as_numpy("row")[0][0]) for r in valid] == [float(i) for i in VALID]
        assert all(answered_by_door(r) for r in valid)  # answered on the route, not handed to the coordinator
    later = [_infer(address, i) for i in VALID]
    assert all(answered_by_door(r) for r in later)
    assert door_requests(metrics_port, MODEL, "handed_over") == 0
    infra.wait_until(lambda: door_requests(metrics_port, MODEL, "invalid_argument") >= ROUNDS, 10,
                     "the bad requests reported as their own failures")


def test_a_bad_request_alone_gets_the_nodes_error_and_keeps_the_route(door):
    address, metrics_port = door
    for _ in range(ROUNDS):
        with pytest.raises(triton_utils.InferenceServerException) as bad:
            _infer(address, BAD)
        assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert re.search(r"out of (data )?bounds|out of range", bad.value.message()), bad.value.message()
        assert answered_by_door(_infer(address, 7))
    assert door_requests(metrics_port, MODEL, "handed_over") == 0
