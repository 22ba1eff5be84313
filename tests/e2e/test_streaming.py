"""ModelStreamInfer (tritonclient's start_stream / async_stream_infer, perf_analyzer --streaming)
with Triton's semantics, through the front door and through the coordinator alone: requests of
one stream run concurrently and batch together, replies come back in request order, a failed
request answers in its place with error_message and the stream goes on."""
from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec
from services.common.registry_client import RegistryClient
from services.coordinator.door_process import BUILT
from services.models.digits import load_all
from tests.e2e.processes import server_ready, start_coordinator, start_runtime

QUEUE_DELAY_US = 20_000


@pytest.fixture(scope="module", params=[
    "door",
    pytest.param("python", id="no-door"),
])
def coordinator(request, mesh):
    """(gRPC address, metrics port) of a coordinator of its own, with or without its front door."""
    if request.param == "door" and not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    proc, address, _, metrics_port = start_coordinator(
        mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="on" if request.param == "door" else "off")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        yield address, metrics_port
    finally:
        infra.stop(proc)


def _put(mesh, batching: BatchingSpec) -> None:
    async def put() -> None:
        client = RegistryClient(mesh.registry)
        try:
            await client.put_deployment(DeploymentSpec(model="digits", batching=batching))
        finally:
            await client.close()
    asyncio.run(put())


def _tensor(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


@pytest.fixture
def held_batches(mesh, coordinator):
    """digits batches wait up to 20 ms for more rows, on this coordinator's path, for one test."""
    address, _ = coordinator
    x, _ = load_all()
    _put(mesh, BatchingSpec(max_batch_size=64, max_queue_delay_us=QUEUE_DELAY_US))
    client = triton.InferenceServerClient(address)

    def lone_request_is_held() -> bool:
        start = time.monotonic()
        client.infer("digits", [_tensor(x[:1])], client_timeout=10)
        return time.monotonic() - start >= QUEUE_DELAY_US / 1e6

    try:
        # The coordinator drops its cached deployment on the registry's event; the door's route
        # follows when it is next refreshed.
        infra.wait_until(lone_request_is_held, 20, "the queue delay applied")
        yield
    finally:
        client.close()
        _put(mesh, BatchingSpec())


def _batches(metrics_port: int) -> tuple[float, float]:
    """(batches, rows in them) this coordinator has booked for digits (its door's included)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    count = re.search(r'^cnei_batch_size_count\{model="digits"\} (\S+)$', text, re.M)
    total = re.search(r'^cnei_batch_size_sum\{model="digits"\} (\S+)$', text, re.M)
    return float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0


def _stream(address: str, requests: list[dict], timeout: float = 30.0) -> list[tuple]:
    """Send every request on one stream without waiting; (result, error) per reply, in the order
    the replies arrived."""
    replies: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(address)
    try:
        client.start_stream(callback=lambda result, error: replies.put((result, error)))
        for kwargs in requests:
            client.async_stream_infer(**kwargs)
        got = [replies.get(timeout=timeout) for _ in requests]
        client.stop_stream()
    finally:
        client.close()
    return got


def test_one_stream_s_requests_batch_together_and_answer_in_request_order(mesh, coordinator, held_batches):
    address, metrics_port = coordinator
    x, _ = load_all()
    direct = triton.InferenceServerClient(mesh.runtime("edge-a1"))
    expected = direct.infer("digits", [_tensor(x[:47])]).as_numpy("probabilities")
    direct.close()
    requests = [dict(model_name="digits", inputs=[_tensor(x[i:i + 1])], request_id=str(i)) for i in range(47)]
    # Last, a request the coordinator refuses: answered within milliseconds while the 47 wait out
    # the queue delay, it must still come back last.
    requests.append(dict(model_name="digits", inputs=[_tensor(x[:1, :63])], request_id="47"))
    batches_before, rows_before = _batches(metrics_port)
    replies = _stream(address, requests)

    def booked() -> tuple[float, float]:
        now = _batches(metrics_port)
        return now[0] - batches_before, now[1] - rows_before

    # A front door reports what it served every 100 ms; the coordinator books it then.
    infra.wait_until(lambda: booked()[1] >= 47, 10, "the 47 rows booked")
    batches, rows = booked()

    ids = [(result.get_response().id if result is not None else "47") for result, _ in replies]
    assert ids == [str(i) for i in range(48)]
    assert [e for _, e in replies[:47]] == [None] * 47
    np.testing.assert_allclose(np.stack([r.as_numpy("probabilities")[0] for r, _ in replies[:47]]),
                               expected, rtol=1e-4, atol=1e-5)
    assert replies[47][1] is not None and "INVALID_ARGUMENT" in str(replies[47][1])
    assert rows == 47
    assert batches < 47 / 4, f"{batches} batches for 47 rows: the stream's requests ran one by one"


def test_a_failed_request_answers_in_its_place_and_the_stream_goes_on(coordinator):
    address, _ = coordinator
    x, y = load_all()
    replies = _stream(address, [
        dict(model_name="digits", inputs=[_tensor(x[0:1])], request_id="a"),
        dict(model_name="no-such-model", inputs=[_tensor(x[1:2])], request_id="b"),
        dict(model_name="digits", inputs=[_tensor(x[2:3])], request_id="c"),
    ])
    (first, e1), (_, e2), (third, e3) = replies
    assert e1 is None and e3 is None
    assert (first.get_response().id, third.get_response().id) == ("a", "c")
    assert int(first.as_numpy("probabilities").argmax()) == int(y[0])
    assert int(third.as_numpy("probabilities").argmax()) == int(y[2])
    assert "NOT_FOUND" in str(e2) and "no-such-model" in str(e2)


def test_a_stream_request_whose_timeout_passes_while_queued_fails_in_place(coordinator, held_batches):
    """tritonclient's per-request `timeout` (µs) on a stream: 5 ms, shorter than the 20 ms queue
    delay, so it expires queued; the request after it, without a timeout, is served."""
    address, _ = coordinator
    x, y = load_all()
    replies = _stream(address, [
        dict(model_name="digits", inputs=[_tensor(x[0:1])], request_id="short", timeout=5_000),
        dict(model_name="digits", inputs=[_tensor(x[1:2])], request_id="patient"),
    ])
    (_, expired), (served, error) = replies
    assert expired is not None and "DEADLINE_EXCEEDED" in str(expired)
    assert error is None and served.get_response().id == "patient"
    assert int(served.as_numpy("probabilities").argmax()) == int(y[1])


def test_a_cancelled_stream_leaves_the_coordinator_serving(coordinator, held_batches):
    address, _ = coordinator
    x, y = load_all()
    client = triton.InferenceServerClient(address)
    try:
        client.start_stream(callback=lambda result, error: None)
        for i in range(8):
            client.async_stream_infer("digits", [_tensor(x[i:i + 1])], request_id=str(i))
        client.stop_stream(cancel_requests=True)  # while they wait out the queue delay
    finally:
        client.close()
    replies = _stream(address, [dict(model_name="digits", inputs=[_tensor(x[8:9])], request_id="after")])
    assert replies[0][1] is None
    assert int(replies[0][0].as_numpy("probabilities").argmax()) == int(y[8])


def test_a_node_killed_under_stream_load_loses_no_request(mesh, coordinator, tmp_path):
    """One stream keeps ~8 requests in flight to a region whose only node is killed -9 halfway:
    every request still gets its reply (the door hands its requests to the coordinator, which
    fails over), none an error, and none is served by the dead node once it is gone."""
    address, _ = coordinator
    x, _ = load_all()
    victim, _ = start_runtime(mesh, "edge-s1", "site-s", tmp_path)
    replies: list[tuple[float, str, str]] = []  # (time, request id, node), or the error for node
    errors: list[str] = []
    done = threading.Condition()

    def on_reply(result, error):
        with done:
            if error is not None:
                errors.append(str(error))
            else:
                response = result.get_response()
                replies.append((time.monotonic(), response.id, response.parameters["cnei_node"].string_param))
            done.notify_all()

    client = triton.InferenceServerClient(address)
    sent, killed_at = 0, None
    try:
        time.sleep(1.5)  # the coordinator sees the new node
        client.start_stream(callback=on_reply)
        start = time.monotonic()
        while time.monotonic() - start < 5.0:
            if killed_at is None and time.monotonic() - start >= 2.0:
                killed_at = time.monotonic()
                os.kill(victim.pid, signal.SIGKILL)
            with done:
                done.wait_for(lambda: sent - len(replies) - len(errors) < 8, timeout=10)
            client.async_stream_infer("digits", [_tensor(x[sent % len(x)][None, :])], request_id=str(sent),
                                      parameters={"region": "site-s"})
            sent += 1
        with done:
            assert done.wait_for(lambda: len(replies) + len(errors) == sent, timeout=30), \
                f"{sent - len(replies) - len(errors)} of {sent} requests never answered"
        client.stop_stream()
    finally:
        client.close()
        if victim.poll() is None:
            victim.kill()
    assert errors == [], f"{len(errors)} failed requests: {errors[:3]}"
    assert [rid for _, rid, _ in replies] == [str(i) for i in range(sent)]  # in request order
    assert any(node == "edge-s1" for t, _, node in replies if t < killed_at), \
        "the victim never took traffic; the test proves nothing"
    after = [node for t, _, node in replies if t >= killed_at + 1.0]
    assert after and "edge-s1" not in after
