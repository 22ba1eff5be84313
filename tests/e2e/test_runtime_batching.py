"""An edge runtime batches the requests that wait for a model, whoever sends them: concurrent
tritonclient callers of its own OIP port share ONNX Runtime calls and each gets its own rows; a
request whose `timeout_us` passes while it waits is answered DEADLINE_EXCEEDED and never run."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils as triton_utils

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec
from services.models.digits import load_all
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.processes import push_digits_as, put_deployment, start_runtime

# Every digits call on a thread (never inline on the event loop) and ~1000x slower (busy), one
# call at a time: what arrives while a call runs waits in the runtime's batcher. Nothing measured
# on load: 18 runs of each precision, as slow, would only hold the load up and take the CPU.
SLOW = {"CNEI_RUNTIME_INLINE_MAX_US": "0", "CNEI_RUNTIME_EMULATED_SLOWDOWN": "1000",
        "CNEI_RUNTIME_INFERENCE_WORKERS": "1", "CNEI_RUNTIME_MEASURE_ON_LOAD": "false"}


@pytest.fixture(scope="module")
def runtimes(mesh, tmp_path_factory):
    """(batching on, batching off): two runtimes of their own site, digits loaded."""
    tmp = tmp_path_factory.mktemp("runtime-batching")
    procs = []
    try:
        on, on_port = start_runtime(mesh, "edge-rb1", "site-rb", tmp, **SLOW)
        procs.append(on)
        off, off_port = start_runtime(mesh, "edge-rb2", "site-rb", tmp, CNEI_RUNTIME_BATCHING="false", **SLOW)
        procs.append(off)
        yield f"127.0.0.1:{on_port}", f"127.0.0.1:{off_port}"
    finally:
        for proc in procs:
            infra.stop(proc)


def _infer(address: str, sample: np.ndarray, model: str = "digits", **parameters) -> np.ndarray:
    client = triton.InferenceServerClient(address)
    try:
        tensor = triton.InferInput("input", list(sample.shape), "FP32")
        tensor.set_data_from_numpy(sample)
        return client.infer(model, [tensor], parameters=parameters or None, client_timeout=60).as_numpy("probabilities")
    finally:
        client.close()


def _counts(address: str, model: str = "digits") -> tuple[int, int, dict[int, int]]:
    """(rows run, executions, executions by batch size) of the model on that runtime so far."""
    client = triton.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    finally:
        client.close()
    by_size: dict[int, int] = {}
    for s in stats:
        for b in s.get("batch_stats", []):
            by_size[int(b["batch_size"])] = by_size.get(int(b["batch_size"]), 0) + int(b["compute_infer"]["count"])
    return (sum(int(s.get("inference_count", 0)) for s in stats),
            sum(int(s.get("execution_count", 0)) for s in stats), by_size)


def _together(address: str, samples: list[np.ndarray], model: str = "digits") -> list[np.ndarray]:
    """Send every sample from its own thread at once; their answers in sample order."""
    answers: list = [None] * len(samples)
    start = threading.Barrier(len(samples))

    def one(i: int) -> None:
        start.wait()
        try:
            answers[i] = _infer(address, samples[i], model)
        except Exception as exc:  # noqa: BLE001 - checked below
            answers[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(samples))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [a for a in answers if isinstance(a, Exception)]
    assert not errors, errors
    return answers


def _samples(count: int, offset: int) -> list[np.ndarray]:
    x, _ = load_all()
    return [x[offset + i][None, :].astype(np.float32) for i in range(count)]


def test_concurrent_direct_callers_share_onnx_runtime_calls_and_each_gets_its_rows(runtimes):
    on, _ = runtimes
    samples = _samples(8, 100)
    alone = [_infer(on, s) for s in samples]  # one at a time: batches of one
    rows0, executions0, sizes0 = _counts(on)
    together = _together(on, samples)
    rows1, executions1, sizes1 = _counts(on)
    for mine, expected in zip(together, alone):
        np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-6)
    assert rows1 - rows0 == 8
    assert executions1 - executions0 < 8, "eight concurrent requests ran as eight ONNX Runtime calls"
    assert any(size > 1 and count > sizes0.get(size, 0) for size, count in sizes1.items()), sizes1


def test_without_batching_every_request_is_its_own_call(runtimes):
    _, off = runtimes
    samples = _samples(6, 200)
    alone = [_infer(off, s) for s in samples]
    rows0, executions0, _ = _counts(off)
    together = _together(off, samples)
    rows1, executions1, sizes1 = _counts(off)
    for mine, expected in zip(together, alone):
        np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-6)
    assert (rows1 - rows0, executions1 - executions0) == (6, 6)
    assert set(sizes1) == {1}


def test_a_request_whose_timeout_passes_before_it_runs_is_deadline_exceeded_and_never_run(runtimes):
    on, _ = runtimes
    sample, = _samples(1, 300)
    rows0, executions0, _ = _counts(on)
    with pytest.raises(triton_utils.InferenceServerException) as caught:
        _infer(on, sample, timeout_us=1)  # passes before the request reaches the model
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "passed its deadline" in caught.value.message() and "digits" in caught.value.message()
    assert _counts(on)[:2] == (rows0, executions0), "the expired request was run"
    np.testing.assert_allclose(_infer(on, sample, timeout_us=60_000_000), _infer(on, sample), rtol=1e-6)


def test_a_bad_queue_parameter_is_invalid_argument_naming_it(runtimes):
    on, _ = runtimes
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
    request.parameters["priority"].string_param = "urgent"
    with grpc.insecure_channel(on) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'priority' must be a number, got 'urgent'" in caught.value.details()


def test_the_model_config_shows_dynamic_batching_only_where_the_runtime_batches(runtimes):
    on, off = runtimes
    configs = {}
    for address in (on, off):
        client = triton.InferenceServerClient(address)
        try:
            configs[address] = client.get_model_config("digits").config
        finally:
            client.close()
    assert configs[on].max_batch_size > 0 and configs[off].max_batch_size > 0  # both take clients' batches
    assert configs[on].HasField("dynamic_batching") and not configs[off].HasField("dynamic_batching")
    assert configs[on].dynamic_batching.max_queue_delay_microseconds == 0  # CNEI_RUNTIME_BATCH_QUEUE_DELAY_US


def test_merged_calls_keep_within_the_deployment_s_batch_size_and_follow_its_changes(runtimes, mesh, digits_models):
    """A deployment's `max_batch_size` bounds what the runtime merges from its callers (whoever
    they are), as it bounds the coordinator's batches; a changed deployment applies at once."""
    on, _ = runtimes
    model = push_digits_as(mesh, digits_models, "digits-rb-cap")
    put_deployment(mesh, DeploymentSpec(model=model, batching=BatchingSpec(max_batch_size=2)))
    samples = _samples(8, 400)
    alone = [_infer(on, s, model) for s in samples]  # loads it; one at a time
    _, _, sizes0 = _counts(on, model)
    for mine, expected in zip(_together(on, samples, model), alone):
        np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-6)
    _, _, capped = _counts(on, model)
    assert max(capped) == 2 and capped[2] > sizes0.get(2, 0), capped  # merged, two rows at most

    put_deployment(mesh, DeploymentSpec(model=model, batching=BatchingSpec(max_batch_size=64)))

    def merges_past_two() -> bool:
        _together(on, samples, model)
        return max(_counts(on, model)[2]) > 2
    infra.wait_until(merges_past_two, 20, "the runtime merging past the old cap after the deployment changed")
