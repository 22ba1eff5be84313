"""The baseline scheduler policies through the compiled front door choose a node per request, as
the full path does (not one node per route lifetime): round_robin and random spread sequential
requests over every node, least_loaded sends a request to an idle node while another is busy."""
from __future__ import annotations

import collections
import time

import numpy as np
import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.cli.up import RUNTIMES
from services.common.deployment import DeploymentSpec, SchedulerSpec
from services.coordinator.door_process import BUILT
from tests.e2e.processes import Load, push_digits_as, put_deployment, start_door

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
