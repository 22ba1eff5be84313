"""Triton's failure count on an edge runtime: a request for a model it serves that fails, a
malformed one included, counts in that model version's statistics (ModelStatistics' fail,
`nv_inference_request_failure`); one for a model it does not know counts nowhere. The runtime core
behind a real OIP gRPC server, against the module's registry process."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.common import triton_metrics
from services.edge_runtime.core import EdgeRuntime
from services.pb.inference import grpc_service_pb2 as pb
from tests.edge_runtime.oip_serving import send_row, serving

SLOWDOWN = 20_000.0  # a digits row's ~20 us run takes ~0.4 s


@pytest.fixture
async def served(registry, push_digits, tmp_path):
    async with serving(registry, push_digits, tmp_path, "fails") as running:
        yield running


@pytest.fixture
async def served_slowly(registry, push_digits, tmp_path):
    """`served`, each model run taking ~0.4 s off the event loop."""
    async with serving(registry, push_digits, tmp_path, "fails", inline_max_us=0.0,
                       emulated_slowdown=SLOWDOWN) as running:
        yield running


async def _failures(stub, runtime: EdgeRuntime, model: str) -> tuple[int, float]:
    """(ModelStatistics' fail count, nv_inference_request_failure) of the model's version 1."""
    reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model, version="1"), timeout=5)
    registry = CollectorRegistry()
    triton_metrics.register(runtime.stats.select, registry)
    metric = next(s.value for family in text_string_to_metric_families(generate_latest(registry).decode())
                  for s in family.samples if s.name == "nv_inference_request_failure"
                  and (s.labels["model"], s.labels["version"]) == (model, "1"))
    return reply.model_stats[0].inference_stats.fail.count, metric


@pytest.mark.parametrize(("case", "version", "name", "raw_bytes"), [
    ("malformed: raw bytes short of the shape", "", "input", 16),
    ("malformed, naming the version", "1", "input", 16),
    ("an input the model lacks", "", "nope", None),
])
async def test_a_failed_request_for_a_served_model_counts_as_a_failure_of_its_version(
        served, case, version, name, raw_bytes):
    stub, runtime, model = served
    assert await send_row(stub, model, version, name, raw_bytes) == "INVALID_ARGUMENT"
    assert await _failures(stub, runtime, model) == (1, 1.0)


@pytest.mark.parametrize("raw_bytes", [None, 16])
async def test_a_failed_request_for_a_model_the_runtime_does_not_know_adds_no_statistics(served, raw_bytes):
    stub, runtime, model = served
    assert await send_row(stub, "no-such-model", raw_bytes=raw_bytes) in ("NOT_FOUND", "INVALID_ARGUMENT")
    assert [(s.name, s.fail.count) for s in runtime.stats.select()] == [(model, 0)]


async def test_a_request_its_client_cancels_counts_as_a_failure_of_its_version(served_slowly):
    stub, runtime, model = served_slowly
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    message.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    call = stub.ModelInfer(message, timeout=10)
    await asyncio.sleep(0.1)  # running
    call.cancel()
    await asyncio.sleep(0.2)
    assert await _failures(stub, runtime, model) == (1, 1.0)
