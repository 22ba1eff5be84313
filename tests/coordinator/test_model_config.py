"""Triton's ModelConfig at the coordinator (gRPC and REST): a batching model's max_batch_size is
the largest batch the coordinator forms, the model's capped by its deployment's, beside the
deployment's other batching rules, as Triton's config shows the batch size its scheduler uses."""
from __future__ import annotations

from dataclasses import replace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.common.deployment import BatchingSpec, DeploymentSpec
from services.common.model_spec import TensorSpec
from services.coordinator.rest import build_app
from services.pb.inference import grpc_service_pb2 as pb
from tests.coordinator import mesh


@pytest.mark.parametrize(("model_max", "deployed_max", "shown"), [
    ("1024", 64, 64),  # the deployment caps the batches
    ("8", 64, 8),  # the model accepts fewer rows than the deployment allows
])
async def test_the_config_shows_the_max_batch_size_the_coordinator_batches_to(model_max, deployed_max, shown):
    spec = DeploymentSpec(model="m", batching=BatchingSpec(max_batch_size=deployed_max, max_queue_delay_us=500,
                                                           preferred_batch_sizes=(4,)))
    async with mesh.mesh([mesh.variant(max_batch_size=model_max)], {"m": spec}, {"n1": mesh.NodeCore()}) as m:
        config = (await m.stub.ModelConfig(pb.ModelConfigRequest(name="m"), timeout=10)).config
        async with TestClient(TestServer(build_app(m.core))) as client:
            rest = await (await client.get("/v2/models/m/config")).json()
    assert config.max_batch_size == shown and list(config.input[0].dims) == [2]
    assert (config.dynamic_batching.max_queue_delay_microseconds, list(config.dynamic_batching.preferred_batch_size)) \
        == (500, [4])
    assert rest["max_batch_size"] == shown
    assert rest["dynamic_batching"]["max_queue_delay_microseconds"] == 500


async def test_a_model_that_takes_no_batches_keeps_max_batch_size_0():
    fixed = replace(mesh.variant(), inputs=[TensorSpec("x", "FP32", (1, 2))])  # no batch dimension
    async with mesh.mesh([fixed], {"m": DeploymentSpec(model="m")}, {"n1": mesh.NodeCore()}) as m:
        config = (await m.stub.ModelConfig(pb.ModelConfigRequest(name="m"), timeout=10)).config
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 2]
