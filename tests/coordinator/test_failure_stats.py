"""Triton's failure count on the coordinator: a request for a model that fails, whatever fails
(the registry away, a malformed request, no node), counts in that model version's statistics
(ModelStatistics' fail, `nv_inference_request_failure`); one for a model or version never served
here counts nowhere. A real coordinator and stand-in runtimes over gRPC (tests/coordinator/mesh.py)."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.common import triton_metrics
from services.common.errors import Unavailable
from services.pb.inference import grpc_service_pb2 as pb
from tests.coordinator import mesh


class RegistryAway(mesh.VersionedCatalog):
    """The registry's answers until `away` is set, then UNAVAILABLE (its cache entries expired)."""

    away = False

    async def deployment(self, model: str):
        if self.away:
            raise Unavailable("model registry unreachable")
        return await super().deployment(model)

    async def variants(self, model: str, version: str = ""):
        if self.away:
            raise Unavailable("model registry unreachable")
        return await super().variants(model, version)


async def _send(m: mesh.Mesh, model: str = "m", version: str = "", rows: int = 1, raw_bytes: int | None = None) -> str:
    """One ModelInfer of x [rows, 2] (`raw_bytes`: that many bytes of it): its status name."""
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    message.inputs.add(name="x", datatype="FP32", shape=[rows, 2])
    message.raw_input_contents.append(np.ones((rows, 2), np.float32).tobytes()[:raw_bytes])
    try:
        await m.stub.ModelInfer(message, timeout=5)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def _failures(m: mesh.Mesh, model: str, version: str) -> tuple[int, float]:
    """(ModelStatistics' fail count, nv_inference_request_failure) of the model version."""
    reply = await m.stub.ModelStatistics(pb.ModelStatisticsRequest(name=model, version=version), timeout=5)
    registry = CollectorRegistry()
    triton_metrics.register(m.core.stats.select, registry)
    metric = next(s.value for family in text_string_to_metric_families(generate_latest(registry).decode())
                  for s in family.samples if s.name == "nv_inference_request_failure"
                  and (s.labels["model"], s.labels["version"]) == (model, version))
    return reply.model_stats[0].inference_stats.fail.count, metric


@pytest.fixture
async def served():
    """A mesh whose model `m` (version 1) answered one request naming no version."""
    async with mesh.mesh([mesh.variant()], {}, {"n1": mesh.NodeCore()}) as m:
        m.core.catalog = RegistryAway([mesh.variant()], {})
        assert await _send(m) == "OK"
        yield m


@pytest.mark.parametrize("version", ["", "1"])
async def test_requests_failing_while_the_registry_is_away_count_as_failures_of_the_version_that_serves_them(
        served, version):
    served.core.catalog.away = True
    assert [await _send(served, version=version) for _ in range(5)] == ["UNAVAILABLE"] * 5
    assert await _failures(served, "m", "1") == (5, 5.0)


@pytest.mark.parametrize(("case", "rows", "raw_bytes", "status"), [
    ("malformed: raw bytes short of the shape", 1, 4, "INVALID_ARGUMENT"),
    ("more rows than max_batch_size", 9, None, "INVALID_ARGUMENT"),
])
async def test_a_request_refused_before_any_node_is_asked_counts_as_a_failure_of_the_model_version(
        served, case, rows, raw_bytes, status):
    assert await _send(served, rows=rows, raw_bytes=raw_bytes) == status
    assert await _failures(served, "m", "1") == (1, 1.0)


async def test_a_request_no_node_can_serve_counts_as_a_failure_of_the_model_version(served):
    await served.leave_and_join()
    assert await _send(served) == "UNAVAILABLE"
    assert await _failures(served, "m", "1") == (1, 1.0)


@pytest.mark.parametrize(("model", "version", "away"), [
    ("nope", "", False),  # NOT_FOUND: no such model
    ("m", "7", False),  # NOT_FOUND: no such version
    ("nope", "", True),  # the registry cannot say: a name clients make up adds no series
    ("m", "7", True),
])
async def test_a_failed_request_for_a_model_or_version_never_served_here_adds_no_statistics(
        served, model, version, away):
    served.core.catalog.away = away
    assert await _send(served, model, version) == ("UNAVAILABLE" if away else "NOT_FOUND")
    assert [(s.name, s.version, s.fail.count) for s in served.core.stats.select()] == [("m", "1", 0)]


async def test_a_request_its_client_cancels_counts_as_a_failure_of_the_model_version():
    async with mesh.mesh([mesh.variant()], {}, {"n1": mesh.NodeCore(delay_s=0.3)}) as m:
        assert await _send(m) == "OK"
        call = m.call()
        await asyncio.sleep(0.1)  # at the node
        call.cancel()
        await asyncio.sleep(0.3)
        assert await _failures(m, "m", "1") == (1, 1.0)
        assert m.core.stats.get("m", "1").success.count == 1
