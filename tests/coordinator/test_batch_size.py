"""Triton's batch-size check at the coordinator without its front door (gRPC and REST): a client's
request of more rows than the max_batch_size ModelConfig shows (the model's, capped by its
deployment's) is INVALID_ARGUMENT in Triton's words, and reaches no node; a model without a batch
dimension, an ensemble's steps and joint inference's escalations are served as before."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.common import oip
from services.common.deployment import BatchingSpec, DeploymentSpec, EnsembleStep, JointSpec
from services.common.model_spec import FORMED_BATCH, TensorSpec
from services.coordinator.rest import build_app
from services.pb.inference import grpc_service_pb2 as pb
from tests.coordinator import mesh


def rows(count: int) -> np.ndarray:
    return np.arange(count * 2, dtype=np.float32).reshape(count, 2)


async def send(m: mesh.Mesh, model: str, inputs: dict[str, np.ndarray]) -> tuple[str, object]:
    """("OK", response) or (status name, details) of a ModelInfer of `inputs`."""
    message = oip.request_to_proto(oip.InferRequest(model, inputs))
    try:
        return "OK", oip.response_from_proto(await m.stub.ModelInfer(message, timeout=10))
    except mesh.grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details()


async def rest_infer(m: mesh.Mesh, model: str, x: np.ndarray) -> tuple[int, dict]:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    async with TestClient(TestServer(build_app(m.core))) as client:
        reply = await client.post(f"/v2/models/{model}/infer", json=body)
        return reply.status, await reply.json()


@pytest.mark.parametrize(("model_max", "deployed_max", "shown"), [("8", 4, 4), ("8", 64, 8)],
                         ids=["deployment-caps", "model-caps"])
async def test_a_request_over_the_max_batch_size_the_config_shows_is_invalid_argument_in_tritons_words(
        model_max, deployed_max, shown):
    spec = DeploymentSpec(model="m", batching=BatchingSpec(max_batch_size=deployed_max))
    node = mesh.NodeCore()
    async with mesh.mesh([mesh.variant(max_batch_size=model_max)], {"m": spec}, {"n1": node}) as m:
        config = (await m.stub.ModelConfig(pb.ModelConfigRequest(name="m"), timeout=10)).config
        refused = await m.infer(x=rows(shown + 1))
        http = await rest_infer(m, "m", rows(shown + 1))
        status, served = await m.infer(x=rows(shown))
    message = f"inference request batch-size must be <= {shown} for 'm'"
    assert config.max_batch_size == shown
    assert refused == ("INVALID_ARGUMENT", message)
    assert http == (400, {"error": message})
    assert status == "OK" and served.outputs["y"].shape == (shown, 2)
    assert [len(call["x"]) for call in node.calls] == [shown]  # the refused ones reached no node
    assert node.parameters[0][FORMED_BATCH] is True  # the node takes the coordinator's batch as one


async def test_a_model_without_a_batch_dimension_is_served_as_before():
    fixed = replace(mesh.variant(), inputs=[TensorSpec("x", "FP32", (1, 2))], outputs=[TensorSpec("y", "FP32", (1, 2))])
    spec = DeploymentSpec(model="m", batching=BatchingSpec(max_batch_size=1))
    async with mesh.mesh([fixed], {"m": spec}, {"n1": mesh.NodeCore()}) as m:
        config = (await m.stub.ModelConfig(pb.ModelConfigRequest(name="m"), timeout=10)).config
        status, served = await m.infer(x=rows(1))
        wrong = await m.infer(x=rows(2))
    assert config.max_batch_size == 0
    assert status == "OK" and served.outputs["y"].shape == (1, 2)
    assert wrong[0] == "INVALID_ARGUMENT" and "shape [2, 2] but model expects [1, 2]" in wrong[1]


async def test_inputs_that_disagree_on_the_batch_dimension_are_invalid_argument_naming_each():
    pair = replace(mesh.variant(), inputs=[TensorSpec("x", "FP32", (-1, 2)), TensorSpec("w", "FP32", (-1, 2))])
    node = mesh.NodeCore()
    async with mesh.mesh([pair], {"m": DeploymentSpec(model="m")}, {"n1": node}) as m:
        status, details = await send(m, "m", {"x": rows(2), "w": rows(3)})
    assert status == "INVALID_ARGUMENT"
    assert details == "model 'm' batches on the first dimension, but the inputs disagree on it: x 2, w 3"
    assert node.calls == []


async def test_an_input_the_model_does_not_have_is_refused_by_name_not_as_a_batch_size():
    node = mesh.NodeCore()
    async with mesh.mesh([mesh.variant()], {"m": DeploymentSpec(model="m")}, {"n1": node}) as m:
        status, details = await send(m, "m", {"x": rows(2), "X": rows(9)})
    assert (status, details) == ("INVALID_ARGUMENT", "tensor 'X': is not an input of model 'm' (inputs: ['x'])")
    assert node.calls == []


async def test_an_ensemble_is_held_to_its_own_max_batch_size_and_its_steps_to_none_of_theirs():
    """The ensemble shows its steps' models' smallest max_batch_size (8), not their deployments'
    (2): its steps carry its rows, batched alone where over their deployment's, as before."""
    specs = {"m": DeploymentSpec(model="m", batching=BatchingSpec(max_batch_size=2)),
             "e": DeploymentSpec(model="e", ensemble=(EnsembleStep(model="m", inputs=("x=image",),
                                                                   outputs=("y=label",)),))}
    async with mesh.mesh([mesh.variant()], specs, {"n1": mesh.NodeCore()}) as m:
        config = (await m.stub.ModelConfig(pb.ModelConfigRequest(name="e"), timeout=10)).config
        status, served = await send(m, "e", {"image": rows(4)})
        over = await send(m, "e", {"image": rows(9)})
        step_model = await send(m, "m", {"x": rows(4)})
    assert config.max_batch_size == 8
    assert status == "OK" and np.array_equal(served.outputs["label"], rows(4))
    assert over == ("INVALID_ARGUMENT", "inference request batch-size must be <= 8 for 'e'")
    assert step_model == ("INVALID_ARGUMENT", "inference request batch-size must be <= 2 for 'm'")


def unsure(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"p": np.full((len(inputs["x"]), 2), 0.5, np.float32)}


def sure(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"p": np.tile(np.array([0.1, 0.9], np.float32), (len(inputs["x"]), 1))}


async def test_joint_inference_escalates_rows_past_the_cloud_models_max_batch_size():
    """The client's request is held to the edge model's max_batch_size; the rows it escalates go
    to the cloud model as the coordinator's own request, however few that model's batches hold."""
    outputs = (("p", "FP32", (-1, 2)),)
    specs = {"m": DeploymentSpec(model="m", joint=JointSpec(mode="sync", cloud_model="big", threshold=0.8)),
             "big": DeploymentSpec(model="big", batching=BatchingSpec(max_batch_size=2))}
    cloud = mesh.NodeCore(sure)
    async with mesh.mesh([mesh.variant(outputs=outputs), mesh.variant("big", outputs=outputs)], specs,
                         {"e1": mesh.NodeCore(unsure), "c1": cloud}, tiers={"e1": "edge", "c1": "cloud"}) as m:
        status, served = await send(m, "m", {"x": rows(6)})
        direct = await send(m, "big", {"x": rows(6)})
    assert status == "OK" and served.parameters["cnei_escalated"] == 6
    assert np.allclose(served.outputs["p"], sure({"x": rows(6)})["p"])
    assert cloud.models == ["big"]  # the six rows went as one call
    assert direct == ("INVALID_ARGUMENT", "inference request batch-size must be <= 2 for 'big'")
