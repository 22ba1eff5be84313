"""An edge runtime whose inference and node-control APIs are restricted: its fast lane refuses a
connection without the inference key (a hello), its NodeControl service calls without the
node-control key, and a coordinator given the keys (CNEI_COORDINATOR_NODE_HEADERS) serves
through it, front door and fast lane included."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.common import grpc_util
from services.common.errors import ErrorCode, PermissionDenied
from services.common.fastlane import FastClient
from services.common.node_control import NodeControlClients
from services.coordinator.door_process import BUILT
from services.pb.cnei import node_pb2 as npb
from services.pb.inference import grpc_service_pb2 as pb
from tests.e2e.processes import digits_payload, server_ready, start_coordinator, start_fast_runtime, who_served

KEY = ("node-key", "s3cret")
RESTRICTED = "inference,node-control:node-key=s3cret"


@pytest.fixture(scope="module")
def node(mesh, tmp_path_factory):
    proc, address, fast = start_fast_runtime(mesh, "edge-r1", "site-r", tmp_path_factory.mktemp("restricted-node"),
                                             CNEI_RUNTIME_RESTRICTED_APIS=RESTRICTED)
    try:
        yield address, fast
    finally:
        infra.stop(proc)


@pytest.mark.parametrize("headers", [(), (("node-key", "wrong"),), (KEY,)], ids=["no-hello", "wrong-key", "key"])
def test_the_fast_lane_serves_only_a_connection_whose_hello_carries_the_inference_key(node, headers):
    _, fast = node

    async def call() -> bytes:
        client = FastClient(fast, headers=headers)
        try:
            return await client.call(digits_payload(), 10.0)
        finally:
            await client.close()

    if headers == (KEY,):
        reply = pb.ModelInferResponse.FromString(asyncio.run(call()))
        assert reply.model_name == "digits" and reply.raw_output_contents
    else:
        with pytest.raises(PermissionDenied, match="inference API is restricted") as refused:
            asyncio.run(call())
        assert refused.value.code is ErrorCode.PERMISSION_DENIED and "s3cret" not in refused.value.message


def _status(address: str, headers=()) -> npb.NodeStatus:
    """The node's status through the NodeControl client the coordinator and the trainer use."""
    async def ask():
        clients = NodeControlClients(grpc_util.Channels(headers))
        try:
            return await clients.call(address, "GetNodeStatus", npb.NodeStatusRequest(), 10)
        finally:
            await clients.close()
    return asyncio.run(ask())


def _holds_digits(address: str) -> bool:
    return any(m.name == "digits" for m in _status(address, (KEY,)).models)


def test_node_control_needs_the_node_control_key(node):
    address, _ = node
    with pytest.raises(PermissionDenied, match="node-control API is restricted"):
        _status(address)
    with pytest.raises(PermissionDenied):
        _status(address, (("node-key", "wrong"),))
    assert _status(address, (KEY,)).node_id == "edge-r1"


@pytest.mark.parametrize("door", ["on", "off"])
def test_a_coordinator_given_the_keys_serves_through_the_restricted_node(mesh, node, door):
    if door == "on" and not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR=door,
                                            CNEI_COORDINATOR_NODE_HEADERS="node-key=s3cret")
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        served = who_served(client, "site-r", 40)  # the site's node: the fast lane (door on: from the door)
        assert served[("edge-r1", door == "on")] >= 20, dict(served)
        node_address, _ = node
        client.unload_model("digits")  # NodeControl with the key: the restricted node too
        assert not _holds_digits(node_address)
        client.load_model("digits")
        assert _holds_digits(node_address)
    finally:
        client.close()
        infra.stop(proc)


@pytest.mark.parametrize("door", ["on", "off"])
def test_a_coordinator_without_the_keys_fails_over_and_never_passes_the_refusal_on(mesh, node, door):
    """The node refuses it: its requests go to other nodes (the breaker opens), and no client
    hears PERMISSION_DENIED about a header it never had to send."""
    if door == "on" and not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR=door)
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
        nodes = [client.infer("digits", [tensor], parameters={"region": "site-r"}, client_timeout=30)
                 .get_response().parameters["cnei_node"].string_param for _ in range(20)]
        assert "edge-r1" not in nodes and all(nodes), nodes
    finally:
        client.close()
        infra.stop(proc)
