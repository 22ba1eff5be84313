"""A model slower than its deployment's attempt timeout, end to end: served within the client's
deadline through the full path and the compiled front door alike (as Triton waits within the
client's deadline), where every attempt was cut at the attempt timeout, run again on the next
node, and the request failed DEADLINE_EXCEEDED naming an internal fast-lane address."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper, numpy_helper

from services.cli import infra
from services.common.deployment import DeploymentSpec
from services.common.registry_client import RegistryClient
from services.coordinator.door_process import BUILT
from tests.e2e.processes import put_deployment, start_door

WIDTH, LAYERS = 512, 600  # ~0.3 s for 64 rows on one core, ~20 ms for one


def chain_model(path: Path) -> Path:
    """`LAYERS` MatMuls by the identity: slow, and its output is its input."""
    import onnx

    nodes = [helper.make_node("MatMul", ["input" if i == 0 else f"t{i}", "w"],
                              ["output" if i == LAYERS - 1 else f"t{i + 1}"]) for i in range(LAYERS)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", WIDTH])],
                              [numpy_helper.from_array(np.eye(WIDTH, dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def push(mesh, path: Path, name: str) -> None:
    async def go():
        client = RegistryClient(mesh.registry)
        try:
            await client.push_file(path, name, "1", "FP32", {})
        finally:
            await client.close()
    asyncio.run(go())


def infer(address: str, model: str, x: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(address)
    try:
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(model, [tensor], client_timeout=60).as_numpy("output")
    finally:
        client.close()


@pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")
def test_a_model_slower_than_the_attempt_timeout_is_served_through_the_full_path_and_the_door(mesh, tmp_path):
    push(mesh, chain_model(tmp_path / "chain.onnx"), "chain-slow")
    put_deployment(mesh, DeploymentSpec(model="chain-slow", attempt_timeout_ms=50))
    x = np.random.default_rng(0).random((64, WIDTH), dtype=np.float32)
    proc, door_address, _ = start_door(mesh)
    try:
        for address in (mesh.coordinator, door_address, door_address, door_address):
            np.testing.assert_allclose(infer(address, "chain-slow", x), x, rtol=1e-5)
    finally:
        infra.stop(proc)
