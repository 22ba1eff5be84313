"""Canary rollouts of a model's versions (KServe's canaryTrafficPercent): a deployment pins the
stable version requests that name none get, a canary takes its share of them at random and is
pushed to the nodes first (the front door draws between the versions' routes by share), and
`cnei deploy canary|rollback|promote` moves traffic between them."""
from __future__ import annotations

import asyncio
import collections
import subprocess

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.common.deployment import DeploymentSpec, RolloutSpec
from services.pb.cnei import node_pb2 as npb
from services.pb.cnei import node_pb2_grpc as npb_grpc
from services.coordinator.door_process import BUILT
from tests.e2e.processes import push_digits_as, put_deployment, run_cnei, server_ready, start_coordinator

MODEL = "digits-roll"


@pytest.fixture(scope="module")
def two_versions(mesh, digits_models):
    for version in ("1", "2"):
        push_digits_as(mesh, digits_models, MODEL, version)
    put_deployment(mesh, DeploymentSpec(model=MODEL, rollout=RolloutSpec(stable="1")))
    yield MODEL
    put_deployment(mesh, DeploymentSpec(model=MODEL))


def _served(client, count: int, **kwargs) -> collections.Counter:
    """(version, answered by the front door) of `count` requests that name no version."""
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    seen = collections.Counter()
    for _ in range(count):
        reply = client.infer(MODEL, [tensor], client_timeout=30, **kwargs).get_response()
        seen[(reply.model_version, reply.parameters["cnei_front_door"].bool_param)] += 1
    return seen


def _versions(client, count: int) -> set[str]:
    return {version for version, _ in _served(client, count)}


def _cnei(mesh, *args: str) -> subprocess.CompletedProcess:
    return run_cnei("deploy", *args, "--registry", mesh.registry, timeout=60)


def _holds(mesh, version: str) -> list[str]:
    """The edge nodes of the mesh that have MODEL `version` in memory."""
    async def status(address: str):
        async with grpc.aio.insecure_channel(address) as channel:
            return await npb_grpc.NodeControlStub(channel).GetNodeStatus(npb.NodeStatusRequest(), timeout=10)
    return [node for node in ("edge-a1", "edge-b1")
            if any(m.name == MODEL and m.version == version for m in asyncio.run(status(mesh.runtime(node))).models)]


@pytest.fixture(scope="module")
def door(mesh):
    """A coordinator behind its front door that traces nothing (the mesh's traces every request,
    which keeps its door idle)."""
    if not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="on")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready behind its door")
        yield address
    finally:
        infra.stop(proc)


def test_a_canary_takes_its_share_is_pushed_to_the_nodes_and_rolls_back_and_is_promoted(mesh, two_versions, door):
    client = triton.InferenceServerClient(door)
    try:
        # the stable pin holds although version 2 is the latest
        infra.wait_until(lambda: _versions(client, 5) == {"1"}, 10, "the pinned stable version serving")

        out = _cnei(mesh, "canary", MODEL, "2", "--percent", "50")
        assert out.returncode == 0 and "stable v1, canary v2 at 50 %" in out.stdout, out.stderr
        infra.wait_until(lambda: "2" in _versions(client, 10), 10, "the canary taking requests")
        infra.wait_until(lambda: _holds(mesh, "2"), 10, "the canary pushed to an edge node")
        seen = _served(client, 200)
        canary = sum(n for (version, _), n in seen.items() if version == "2")
        assert 60 <= canary <= 140, seen  # 50 % of 200 (binomial: ±40 is over 5 standard deviations)
        # the front door splits them itself once it knows the split route (one route per version)
        by_door = {version: n for (version, door), n in seen.items() if door}
        assert sum(by_door.values()) >= 150 and min(by_door.get("1", 0), by_door.get("2", 0)) >= 40, seen

        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
        for version in ("1", "2"):  # a request that names its version gets it, canary or not
            assert client.infer(MODEL, [tensor], model_version=version).get_response().model_version == version

        out = _cnei(mesh, "rollback", MODEL)
        assert out.returncode == 0 and "stable v1, no canary" in out.stdout, out.stderr
        infra.wait_until(lambda: _versions(client, 20) == {"1"}, 10, "every request back on the stable version")

        assert _cnei(mesh, "canary", MODEL, "2", "--percent", "5").returncode == 0
        out = _cnei(mesh, "promote", MODEL)
        assert out.returncode == 0 and "stable v2, no canary" in out.stdout, out.stderr
        infra.wait_until(lambda: _versions(client, 20) == {"2"}, 10, "every request on the promoted version")
        assert '"stable": "2"' in _cnei(mesh, "get", MODEL).stdout
    finally:
        client.close()


def test_a_rollout_naming_a_version_the_registry_lacks_or_without_a_canary_is_refused(mesh, two_versions):
    missing = _cnei(mesh, "canary", MODEL, "9")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr and "version 9" in missing.stderr
    put_deployment(mesh, DeploymentSpec(model=MODEL, rollout=RolloutSpec(stable="1")))
    nothing = _cnei(mesh, "rollback", MODEL)
    assert nothing.returncode == 2 and "FAILED_PRECONDITION" in nothing.stderr and "no canary to rollback" in nothing.stderr
    for verb in ("promote", "rollback"):  # a model the registry never held: NOT_FOUND, as `canary` says
        unknown = _cnei(mesh, verb, "no-such-model")
        assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr, unknown.stderr
        assert "model 'no-such-model' not found in the registry" in unknown.stderr
