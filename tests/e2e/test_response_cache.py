"""Triton's response cache at the coordinator, with real processes: a deployment with
`response_cache: true` answers inputs it has answered before without a node (the nodes run
nothing more), counts hits and misses in Triton's statistics and metrics (a hit is a success,
not an inference), and never answers a request from another input's or another precision's
answer (an ensemble's: its steps' precisions included)."""
from __future__ import annotations

import asyncio
import re
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.common.deployment import DeploymentSpec, EnsembleStep, PrecisionSpec
from services.common.registry_client import RegistryClient
from services.models.digits import load_all
from services.coordinator.door_process import BUILT
from tests.e2e.processes import push_digits_as, put_deployment, run_perf_analyzer, server_ready, start_coordinator

MODEL = "digits-cached"


@pytest.fixture(scope="module")
def cached_model(mesh, digits_models):
    push_digits_as(mesh, digits_models, MODEL)
    put_deployment(mesh, DeploymentSpec(model=MODEL, response_cache=True))
    return MODEL


def _infer(client, x: np.ndarray, **kwargs):
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(MODEL, [tensor], client_timeout=30, **kwargs)


def _node_executions(mesh) -> int:
    """Executions of MODEL on every runtime of the mesh (their own statistics)."""
    total = 0
    for node_id in ("edge-a1", "edge-b1", "cloud-1"):
        client = triton.InferenceServerClient(mesh.runtime(node_id))
        try:
            total += sum(s.execution_count for s in client.get_inference_statistics(MODEL).model_stats)
        except triton.InferenceServerException:
            pass  # a node that never loaded the model knows nothing of it
        finally:
            client.close()
    return total


def _metric(mesh, name: str, port: int = 0) -> float:
    """Triton's metric `name` for MODEL at the mesh's coordinator (or the one on metrics `port`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port or mesh.settings.metrics_port}/metrics", timeout=5) as reply:
        found = re.findall(rf'^{name}\{{model="{MODEL}",version="1"\}} (\S+)', reply.read().decode(), re.M)
    return float(found[0]) if found else 0.0


@pytest.fixture(scope="module")
def coordinator_without_door(mesh):
    """A coordinator of the mesh serving every request itself (no front door): (address, metrics port)."""
    proc, address, _, metrics_port = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="off")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        yield address, metrics_port
    finally:
        infra.stop(proc)


def test_a_repeated_input_is_answered_from_the_cache_without_a_node(mesh, cached_model):
    x, y = load_all()
    client = triton.InferenceServerClient(mesh.coordinator)
    try:
        first = _infer(client, x[:2])
        assert "cnei_response_cache" not in first.get_response().parameters
        executions = _node_executions(mesh)
        assert executions >= 1
        again = _infer(client, x[:2], request_id="second")
        params = again.get_response().parameters
        assert params["cnei_response_cache"].bool_param
        assert params["cnei_node"].string_param == first.get_response().parameters["cnei_node"].string_param
        assert again.get_response().id == "second"
        np.testing.assert_array_equal(again.as_numpy("probabilities"), first.as_numpy("probabilities"))
        assert list(again.as_numpy("probabilities").argmax(axis=1)) == list(y[:2])
        assert _node_executions(mesh) == executions  # no node ran it

        # other inputs and another precision are answers of their own
        other = _infer(client, x[2:4])
        assert "cnei_response_cache" not in other.get_response().parameters
        assert list(other.as_numpy("probabilities").argmax(axis=1)) == list(y[2:4])
        assert "cnei_response_cache" not in _infer(client, x[:2], parameters={"precision": "FP32"}).get_response().parameters
        assert _infer(client, x[:2], parameters={"precision": "FP32"}).get_response().parameters["cnei_response_cache"].bool_param

        stats = client.get_inference_statistics(MODEL).model_stats[0]
        assert (stats.inference_stats.cache_hit.count, stats.inference_stats.cache_miss.count) == (2, 3)
        assert stats.inference_stats.success.count == 5 and stats.execution_count == 3
    finally:
        client.close()
    client = triton.InferenceServerClient(mesh.coordinator)
    try:
        assert client.get_model_config(MODEL).config.response_cache.enable  # as Triton's config says it
    finally:
        client.close()
    infra.wait_until(lambda: _metric(mesh, "nv_cache_num_hits_per_model") == 2, 10, "Triton's cache hit metric")
    assert _metric(mesh, "nv_cache_num_misses_per_model") == 3


@pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")
def test_the_front_door_answers_repeated_inputs_from_its_own_cache(mesh, cached_model):
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="on")
    x, y = load_all()
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready behind its door")
        row = x[5:6]

        def from_door_cache() -> bool:
            params = _infer(client, row).get_response().parameters
            return "cnei_front_door" in params and "cnei_response_cache" in params
        infra.wait_until(from_door_cache, 10, "an answer from the door's cache")
        executions = _node_executions(mesh)
        before = client.get_inference_statistics(MODEL).model_stats[0].inference_stats.cache_hit.count
        for i in range(5):
            reply = _infer(client, row, request_id=f"r{i}")
            assert reply.get_response().id == f"r{i}"
            assert reply.get_response().parameters["cnei_response_cache"].bool_param
            assert reply.as_numpy("probabilities").argmax() == y[5]
        assert _node_executions(mesh) == executions  # no node ran any of them

        def hits() -> int:
            return client.get_inference_statistics(MODEL).model_stats[0].inference_stats.cache_hit.count
        infra.wait_until(lambda: hits() >= before + 5, 5, "the door's hits in Triton's statistics")
        # perf_analyzer sending one input over and over: every request a hit, reported as such
        report = run_perf_analyzer(MODEL, address, "--input-data", "zero")
        assert "Cache hit count:" in report
        other = _infer(client, x[6:7])  # another input: not an answer of the cache
        assert "cnei_response_cache" not in other.get_response().parameters
        assert other.as_numpy("probabilities").argmax() == y[6]
    finally:
        client.close()
        infra.stop(proc)


def test_cache_hits_are_successes_but_not_inferences_in_statistics_and_metrics(mesh, cached_model,
                                                                              coordinator_without_door):
    """Triton's statistics extension: inference_count "does not include cache hits"; success,
    queue and cache_hit do (and nv_inference_count follows inference_count)."""
    address, metrics_port = coordinator_without_door
    x, _ = load_all()
    client = triton.InferenceServerClient(address)
    try:
        answers = [_infer(client, x[10:12]) for _ in range(3)]
        assert ["cnei_response_cache" in a.get_response().parameters for a in answers] == [False, True, True]
        stats = client.get_inference_statistics(MODEL).model_stats[0]
    finally:
        client.close()
    s = stats.inference_stats
    assert (s.success.count, s.queue.count, s.cache_hit.count, s.cache_miss.count) == (3, 3, 2, 1)
    assert (stats.inference_count, stats.execution_count) == (2, 1)  # the one request that ran: 2 rows
    infra.wait_until(lambda: _metric(mesh, "nv_inference_request_success", metrics_port) == 3, 10, "the metrics")
    assert _metric(mesh, "nv_inference_count", metrics_port) == 2


def test_an_ensemble_answer_kept_at_a_steps_old_precision_is_not_served_after_the_step_changes(
        mesh, digits_models, coordinator_without_door):
    """The step names no precision: its model's deployment decides, and a kept ensemble answer
    computed at FP32 must not answer once the step is served at INT8."""
    step, pipe = "digits-cached-step", "digits-cached-pipe"

    async def push() -> None:
        client = RegistryClient(mesh.registry)
        try:
            for v in digits_models:
                if v.precision in ("FP32", "INT8"):
                    await client.push_file(v.path, step, "1", v.precision, v.metadata)
        finally:
            await client.close()
    asyncio.run(push())
    put_deployment(mesh, DeploymentSpec(model=step, precision=PrecisionSpec(precision="FP32")))
    put_deployment(mesh, DeploymentSpec(model=pipe, response_cache=True, ensemble=(
        EnsembleStep(model=step, inputs=("input=image",), outputs=("probabilities=p",)),)))
    address, _ = coordinator_without_door
    x, _ = load_all()
    client = triton.InferenceServerClient(address)

    def infer(model: str, name: str):
        tensor = triton.InferInput(name, [1, 64], "FP32")
        tensor.set_data_from_numpy(x[7:8])
        return client.infer(model, [tensor], client_timeout=30)
    try:
        assert infer(pipe, "image").get_response().parameters["cnei_ensemble"].string_param.endswith("/FP32")
        assert infer(pipe, "image").get_response().parameters["cnei_response_cache"].bool_param
        put_deployment(mesh, DeploymentSpec(model=step, precision=PrecisionSpec(precision="INT8")))
        infra.wait_until(lambda: infer(step, "input").get_response().parameters["cnei_precision"].string_param
                         == "INT8", 15, "the step model served at INT8")
        again = infer(pipe, "image")
        params = again.get_response().parameters
        assert "cnei_response_cache" not in params
        assert params["cnei_ensemble"].string_param.endswith("/INT8")
        np.testing.assert_array_equal(again.as_numpy("p"), infer(step, "input").as_numpy("probabilities"))
        assert infer(pipe, "image").get_response().parameters["cnei_response_cache"].bool_param  # kept at INT8
    finally:
        client.close()
