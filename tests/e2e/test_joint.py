"""Joint inference end to end: a small edge model escalates low-confidence rows to a larger
cloud model (sync), or the cloud validates in the background and reports disagreements (async)."""
from __future__ import annotations

import asyncio
import json

import nats
import numpy as np
import pytest
import tritonclient.grpc as triton

from services.common import events
from services.common.deployment import BatchingSpec, DeploymentSpec, JointSpec
from services.common.errors import AlreadyExists
from services.common.registry_client import RegistryClient
from services.models import digits


async def _register(registry: str, built, name: str, spec: DeploymentSpec | None = None) -> None:
    client = RegistryClient(registry)
    try:
        for b in built:
            try:
                await client.push_file(b.path, name, "1", b.precision, b.metadata)
            except AlreadyExists:
                pass
        if spec is not None:
            await client.put_deployment(spec)
    finally:
        await client.close()


@pytest.fixture(scope="module")
def joint_models(mesh, tmp_path_factory):
    root = tmp_path_factory.mktemp("joint-models")
    asyncio.run(_register(mesh.registry, digits.build_large(root), digits.LARGE_NAME))
    asyncio.run(_register(mesh.registry, digits.build_tiny(root), digits.TINY_NAME))
    return digits.TINY_NAME


def _set_joint(mesh, mode: str) -> None:
    # the whole test split (450 rows) in one request; the cloud model's deployment batches 64 rows
    # at most, which the rows sent there exceed (the coordinator's own requests: sent as they are)
    spec = DeploymentSpec(model=digits.TINY_NAME, batching=BatchingSpec(max_batch_size=512), joint=JointSpec(
        mode=mode, edge_precision="INT8", cloud_model=digits.LARGE_NAME, threshold=0.9))
    asyncio.run(_register(mesh.registry, [], digits.TINY_NAME, spec))


def _infer(mesh, model: str, x: np.ndarray, **params):
    client = triton.InferenceServerClient(mesh.coordinator)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    reply = client.infer(model, [tensor], parameters=params or None)
    return reply.as_numpy("probabilities"), reply.get_response().parameters


def test_sync_joint_inference_escalates_low_confidence_rows_to_the_cloud_model(mesh, joint_models):
    _set_joint(mesh, "sync")
    _, x, _, y = digits.load_split()
    edge_probs, edge_params = _infer(mesh, joint_models, x, joint="off", tier="edge", precision="INT8")
    joint_probs, params = _infer(mesh, joint_models, x)
    escalated = params["cnei_escalated"].int64_param
    low = int((edge_probs.max(axis=1) < 0.9).sum())
    assert params["cnei_joint"].string_param == "sync"
    assert escalated == low > 0
    assert params["cnei_cloud_node"].string_param == "cloud-1"
    assert edge_params["cnei_tier"].string_param == "edge"
    confident = edge_probs.max(axis=1) >= 0.9
    np.testing.assert_allclose(joint_probs[confident], edge_probs[confident], rtol=1e-5, atol=1e-6)
    assert (joint_probs.argmax(1) == y).mean() >= (edge_probs.argmax(1) == y).mean()


def test_critical_requests_are_always_answered_at_the_edge(mesh, joint_models):
    _set_joint(mesh, "sync")
    _, x, _, _ = digits.load_split()
    _, params = _infer(mesh, joint_models, x, critical=True)
    assert params["cnei_escalated"].int64_param == 0
    assert params["cnei_tier"].string_param == "edge"


async def _disagreements(url: str, model: str, timeout: float = 15.0) -> list[dict]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.subscribe(events.INFERENCE_DISAGREEMENT, ordered_consumer=True)
    found = []
    deadline = asyncio.get_running_loop().time() + timeout
    while not found and asyncio.get_running_loop().time() < deadline:
        try:
            msg = await sub.next_msg(timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        payload = json.loads(msg.data)["payload"]
        if payload["model"] == model:
            found.append(payload)
    await nc.close()
    return found


def test_async_joint_inference_answers_at_the_edge_and_reports_disagreements(mesh, joint_models):
    _set_joint(mesh, "async")
    _, x, _, _ = digits.load_split()
    edge_only, _ = _infer(mesh, joint_models, x, joint="off", tier="edge", precision="INT8")
    probs, params = _infer(mesh, joint_models, x)
    assert params["cnei_joint"].string_param == "async"
    np.testing.assert_allclose(probs, edge_only, rtol=1e-5, atol=1e-6)
    found = asyncio.run(_disagreements(mesh.settings.nats_url, joint_models))
    assert found, "no disagreement event"
    event = found[0]
    assert event["cloud_model"] == digits.LARGE_NAME
    assert len(event["rows"]) == len(event["edge_labels"]) == len(event["inputs"]["input"])
    assert all(e != c for e, c in zip(event["edge_labels"], event["cloud_labels"]))
