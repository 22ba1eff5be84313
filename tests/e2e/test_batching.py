"""End to end: concurrent tritonclient calls are batched by the coordinator, each caller gets
its own rows back; precision policies travel as request parameters."""
from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec
from services.models.digits import load_all
from tests.e2e.processes import put_deployment, start_coordinator


@pytest.fixture
def batching_deployment(mesh):
    spec = DeploymentSpec(model="digits", batching=BatchingSpec(max_batch_size=64, max_queue_delay_us=20_000))
    put_deployment(mesh, spec)
    yield spec
    put_deployment(mesh, DeploymentSpec(model="digits"))


def _batch_histogram(mesh) -> tuple[float, float]:
    """(number of batches, samples in them) sent for digits so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.settings.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    count = re.search(r'^cnei_batch_size_count\{model="digits"\} (\S+)$', text, re.M)
    total = re.search(r'^cnei_batch_size_sum\{model="digits"\} (\S+)$', text, re.M)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


def _one(address: str, sample: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(address)
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(sample[None, :])
    return client.infer("digits", [tensor], client_timeout=30).as_numpy("probabilities")[0]


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_answer(mesh, batching_deployment):
    x, y = load_all()
    direct = triton.InferenceServerClient(mesh.runtime("edge-a1"))
    tensor = triton.InferInput("input", [48, 64], "FP32")
    tensor.set_data_from_numpy(x[:48])
    expected = direct.infer("digits", [tensor]).as_numpy("probabilities")
    batches_before, samples_before = _batch_histogram(mesh)
    stats_before = _statistics(mesh.coordinator)
    with ThreadPoolExecutor(max_workers=48) as pool:
        results = list(pool.map(lambda i: _one(mesh.coordinator, x[i]), range(48)))
    batches_after, samples_after = _batch_histogram(mesh)
    np.testing.assert_allclose(np.stack(results), expected, rtol=1e-4, atol=1e-5)
    assert samples_after - samples_before == 48
    assert batches_after - batches_before < 48, "no two requests shared a batch"
    # Triton's statistics say the same: 48 inferences in fewer executions (the batches the nodes
    # ran, with their compute time), batch_stats by batch size
    infra.wait_until(lambda: _statistics(mesh.coordinator)[0] - stats_before[0] >= 48, 10, "the requests in statistics")
    inferences, executions, compute_ns, batched = (a - b for a, b in zip(_statistics(mesh.coordinator), stats_before))
    assert inferences == 48 and 0 < executions < 48 and compute_ns > 0 and batched > 0


def _statistics(address: str) -> tuple[int, int, int, int]:
    """digits at the coordinator: (inference_count, execution_count, compute_infer ns, executions of
    more than one row)."""
    client = triton.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics("digits").model_stats
    finally:
        client.close()
    return (sum(s.inference_count for s in stats), sum(s.execution_count for s in stats),
            sum(s.inference_stats.compute_infer.ns for s in stats),
            sum(b.compute_infer.count for s in stats for b in s.batch_stats if b.batch_size > 1))


@pytest.fixture(params=["door", "no-door"])
def coordinator(request, mesh):
    """The mesh's coordinator (its front door takes the port), or one serving gRPC itself."""
    if request.param == "door":
        yield mesh.coordinator
        return
    proc, address, _, _ = start_coordinator(mesh, CNEI_COORDINATOR_FRONT_DOOR="off")
    try:
        yield address
    finally:
        infra.stop(proc)


def _queue_stats(address: str) -> tuple[int, int]:
    """digits at the coordinator: (requests through the queue, ns they waited there)."""
    client = triton.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics("digits").model_stats
    finally:
        client.close()
    return sum(s.inference_stats.queue.count for s in stats), sum(s.inference_stats.queue.ns for s in stats)


def _queued_ns_of(address: str, samples: np.ndarray) -> tuple[int, int]:
    """Send each sample alone, one after another: (requests booked in the queue statistics, ns
    they waited there)."""
    count_before, ns_before = _queue_stats(address)
    for sample in samples:
        _one(address, sample)
    infra.wait_until(lambda: _queue_stats(address)[0] - count_before >= len(samples), 10, "the requests in statistics")
    count, ns = _queue_stats(address)
    return count - count_before, ns - ns_before


def test_statistics_book_the_time_each_request_waited_to_be_batched(mesh, batching_deployment, coordinator):
    """A lone request waits out max_queue_delay_us (20 ms) for company: Triton's queue time."""
    x, _ = load_all()
    # the deployment reaches the coordinator (and its door's routes) by an event: a lone request
    # soon waits the delay
    infra.wait_until(lambda: _queued_ns_of(coordinator, x[:1])[1] >= 19e6, 20, "the deployment's queue delay")
    count, ns = _queued_ns_of(coordinator, x[:3])
    assert count == 3
    assert 3 * 19e6 <= ns < 3 * 1e9, f"3 requests waited {ns / 1e6:.1f} ms in all"


@pytest.mark.parametrize("params,precision", [
    ({"accuracy_floor": 0.9}, None),
    ({"latency_budget_ms": 50.0}, None),
    ({"precision": "INT8"}, "INT8"),
])
def test_precision_policies_choose_a_variant_and_report_it(mesh, params, precision):
    client = triton.InferenceServerClient(mesh.coordinator)
    x, _ = load_all()
    tensor = triton.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(x[:2])
    reply = client.infer("digits", [tensor], parameters=params).get_response().parameters
    assert reply["cnei_precision"].string_param in ({precision} if precision else {"FP32", "FP16", "INT8"})
    assert reply["cnei_version"].string_param == "1"
    assert reply["cnei_node"].string_param


def test_an_impossible_accuracy_floor_fails_with_failed_precondition(mesh):
    client = triton.InferenceServerClient(mesh.coordinator)
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [tensor], parameters={"accuracy_floor": 0.9999})
    assert info.value.status() == str(grpc.StatusCode.FAILED_PRECONDITION)
    assert "accuracy_floor" in info.value.message()
