"""The baseline scheduler policies through the compiled front door choose a node per request, as
the full path does (not one node per route lifetime): round_robin and random spread sequential
requests over every node, least_loaded sends a request to an idle node while another is busy, and
passes over a node other clients keep busy, by the full path's measure (requests in flight at the
node by its heartbeat, plus rows sent it, per CPU)."""
from __future__ import annotations

import asyncio
import collections
import time

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper, numpy_helper

from services.cli import infra
from services.cli.up import RUNTIMES
from services.common.deployment import DeploymentSpec, SchedulerSpec
from services.common.registry_client import RegistryClient
from services.coordinator.door_process import BUILT
from tests.e2e.processes import Load, Workers, push_digits_as, put_deployment, server_ready, start_coordinator, start_door
from tests.e2e.processes import start_fast_runtime

pytestmark = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")
MESH_NODES = {node_id for node_id, _, _ in RUNTIMES}  # cloud-1, edge-a1, edge-b1


@pytest.fixture(scope="module")
def steady_door(mesh):
    """Routes kept for 5 s: a route that named one node would serve every request of a test."""
    proc, address, _ = start_door(mesh, CNEI_COORDINATOR_ROUTE_TTL_MS="5000")
    try:
        yield address
    finally:
        infra.stop(proc)


def _deploy(mesh, digits_models, policy: str) -> str:
    """A model of its own deployed under `policy` over every node of the mesh (edge and cloud)."""
    model = push_digits_as(mesh, digits_models, f"digits-{policy.replace('_', '-')}")
    put_deployment(mesh, DeploymentSpec(model=model, scheduler=SchedulerSpec(policy=policy)))
    time.sleep(1.0)  # the coordinator's catalog sees the deployment
    return model


def _sequential(address: str, model: str, count: int) -> collections.Counter:
    """`count` one-row requests one after another: how many each (node, answered by the door) served."""
    client = triton.InferenceServerClient(address)
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    served = collections.Counter()
    try:
        for _ in range(count):
            params = client.infer(model, [tensor], client_timeout=30).get_response().parameters
            served[(params["cnei_node"].string_param,
                    "cnei_front_door" in params and params["cnei_front_door"].bool_param)] += 1
    finally:
        client.close()
    return served


def _warm(address: str, model: str) -> None:
    """The door learns the route and every node loads the model (on the full path meanwhile)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(door for _, door in _sequential(address, model, 12)):
            return
        time.sleep(0.2)


@pytest.mark.parametrize("policy", ["round_robin", "random"])
def test_sequential_requests_under_a_baseline_policy_are_spread_over_every_node_by_the_door(
        steady_door, mesh, digits_models, policy):
    model = _deploy(mesh, digits_models, policy)
    _warm(steady_door, model)
    served = _sequential(steady_door, model, 30)
    by_node = collections.Counter({node: n for (node, _), n in served.items()})
    assert all(door for _, door in served), f"not all answered by the door: {dict(served)}"
    assert set(by_node) >= MESH_NODES, f"one route lifetime went to {dict(by_node)}"
    if policy == "round_robin":  # turns: as even as the count allows
        assert max(by_node.values()) - min(by_node.values()) <= 1, f"uneven turns: {dict(by_node)}"


def test_least_loaded_through_the_door_sends_requests_to_an_idle_node_while_another_is_busy(
        steady_door, mesh, digits_models):
    model = _deploy(mesh, digits_models, "least_loaded")
    _warm(steady_door, model)
    with Load(steady_door, threads=6, region="", model=model) as load:
        time.sleep(2.0)
    assert load.errors == [], f"failed requests: {load.errors[:3]}"
    served = collections.Counter(node for _, _, node in load.results)
    assert set(served) >= MESH_NODES, f"busy nodes were not passed over: {dict(served)}"


HEAVY, HEAVY_WIDTH = "heavy-matmul", 2048  # ~4M multiply-adds a row: over a runtime's inline limit, so batched


def _push_heavy(mesh, tmp_path) -> None:
    weights = np.random.default_rng(0).standard_normal((HEAVY_WIDTH, HEAVY_WIDTH)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["output"])], HEAVY,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", HEAVY_WIDTH])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", HEAVY_WIDTH])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "heavy.onnx")

    async def push():
        client = RegistryClient(mesh.registry)
        try:
            await client.push_file(tmp_path / "heavy.onnx", HEAVY, "1", "FP32", {"max_batch_size": "64"})
        finally:
            await client.close()
    asyncio.run(push())


class Waiting(Workers):
    """Clients of a runtime's own keeping `threads` requests in flight there: one-row HEAVY
    requests, each waiting out the runtime's batch queue delay (little CPU, a steady count)."""

    def __init__(self, address: str, threads: int):
        super().__init__(threads)
        self.address, self.answered = address, 0

    def _run(self, index: int) -> None:
        client = triton.InferenceServerClient(self.address)
        tensor = triton.InferInput("input", [1, HEAVY_WIDTH], "FP32")
        tensor.set_data_from_numpy(np.ones((1, HEAVY_WIDTH), np.float32))
        try:
            while not self._stop.is_set():
                client.infer(HEAVY, [tensor], client_timeout=60)
                self.answered += 1
        finally:
            client.close()


def _served_by(address: str, model: str, seconds: float) -> collections.Counter:
    with Load(address, threads=6, region="", model=model) as load:
        time.sleep(seconds)
    assert load.errors == [], f"failed requests: {load.errors[:3]}"
    return collections.Counter(node for _, _, node in load.results)


def test_least_loaded_through_the_door_passes_over_a_node_other_clients_keep_busy_as_the_full_path_does(
        mesh, digits_models, tmp_path):
    """A node whose own clients keep 12 requests in flight there (its heartbeat says so) answers
    the door's requests as fast as any: by requests queued and in flight at the door alone it got
    its share of them (a third); by the full path's measure next to none while the others have fewer."""
    model = _deploy(mesh, digits_models, "least_loaded")
    _push_heavy(mesh, tmp_path)
    busy, busy_address, _ = start_fast_runtime(mesh, "edge-0-busy", "site-busy", tmp_path,  # listed first of the rest
                                               CNEI_RUNTIME_BATCH_QUEUE_DELAY_US="400000")
    door, door_address, _ = start_door(mesh)
    plain, plain_address, _, _ = start_coordinator(mesh, CNEI_COORDINATOR_FRONT_DOOR="off")
    try:
        infra.wait_until(lambda: server_ready(plain_address), 30, "the coordinator without a door ready")
        direct = triton.InferenceServerClient(busy_address)
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
        direct.infer(model, [tensor], client_timeout=30)  # loaded there: it answers the door at once
        direct.close()
        with Waiting(busy_address, threads=12) as waiting:
            infra.wait_until(lambda: waiting.answered >= 12, 60, "the busy node's own clients answered once")
            time.sleep(1.0)  # its heartbeats say how many it holds
            _warm(door_address, model)
            by_door = _served_by(door_address, model, 3.0)
            by_full_path = _served_by(plain_address, model, 3.0)
    finally:
        infra.stop(plain)
        infra.stop(door)
        infra.stop(busy)
    for served in (by_door, by_full_path):
        assert set(served) - {"edge-0-busy"} >= MESH_NODES, f"not spread over the idle nodes: {dict(served)}"
    assert by_full_path["edge-0-busy"] <= 0.1 * sum(by_full_path.values()), dict(by_full_path)
    assert by_door["edge-0-busy"] <= 0.1 * sum(by_door.values()), dict(by_door)
