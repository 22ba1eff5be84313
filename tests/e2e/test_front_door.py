"""The coordinator behind its compiled front door: routable requests are batched straight to
the nodes with every caller's own rows back, every other call of the services its port serves
passes through to the coordinator unchanged (the door's control service, as any other, is refused:
see test_front_door_passes.py), a node killed under load loses no request, and SIGTERM stops both
processes."""
from __future__ import annotations

import collections
import os
import re
import signal
import socket
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
import tritonclient.utils as triton_utils
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec, RolloutSpec, SchedulerSpec
from services.cli.up import RUNTIMES
from services.coordinator.door_process import BUILT
from services.models.digits import load_all
from services.pb.cnei import frontdoor_pb2 as fd
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.processes import (Load, children, kill_under_load, push_digits_as, put_deployment, server_ready,
                                 start_coordinator, start_door, start_runtime)

pytestmark = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")


@pytest.fixture(scope="module")
def door(mesh):
    proc, address, metrics_port = start_door(mesh)
    try:
        yield proc, address, metrics_port
    finally:
        infra.stop(proc)


@pytest.fixture(scope="module")
def steady_door(mesh):
    """A coordinator of its own that keeps each route for 5 s: placement cannot move requests of
    one test to different nodes (and batchers) halfway through."""
    proc, address, metrics_port = start_door(mesh, CNEI_COORDINATOR_ROUTE_TTL_MS="5000")
    try:
        yield proc, address, metrics_port
    finally:
        infra.stop(proc)


def _infer(client, x: np.ndarray, **kwargs):
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer("digits", [tensor], client_timeout=30, **kwargs)


def _direct(mesh, x: np.ndarray) -> np.ndarray:
    """edge-a1's probabilities for `x`, asked of it directly in requests of at most 64 rows (the
    max_batch_size its config shows)."""
    client = triton.InferenceServerClient(mesh.runtime("edge-a1"))
    try:
        return np.concatenate([_infer(client, x[i:i + 64]).as_numpy("probabilities") for i in range(0, len(x), 64)])
    finally:
        client.close()


def _batched_executions(mesh) -> int:
    """Executions of more than one row on every runtime of the mesh (their statistics)."""
    total = 0
    for node_id, _, _ in RUNTIMES:
        client = triton.InferenceServerClient(mesh.runtime(node_id))
        try:
            for s in client.get_inference_statistics("digits").model_stats:
                total += sum(b.compute_infer.count for b in s.batch_stats if b.batch_size > 1)
        finally:
            client.close()
    return total


def _metric(port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.findall(rf"^{name}\{{{labels}\}} (\S+)", text, re.M)
    return float(found[0]) if found else 0.0


def _executions(address: str) -> int:
    client = triton.InferenceServerClient(address)
    try:
        return sum(s.inference_count for s in client.get_inference_statistics("digits").model_stats)
    finally:
        client.close()


def test_concurrent_requests_are_batched_straight_to_the_nodes_and_each_caller_gets_its_rows(door, mesh):
    _, address, metrics_port = door
    x, _ = load_all()
    expected = _direct(mesh, x[:200])
    _infer(triton.InferenceServerClient(address), x[:1], parameters={"precision": "FP32"})  # learns the route
    time.sleep(0.3)
    served_before, batched_before = _executions(address), _batched_executions(mesh)
    batches_before = [_metric(metrics_port, f"cnei_batch_size_{k}", 'model="digits"') for k in ("count", "sum")]
    threads, per_thread, results, errors = 16, 12, {}, []

    def caller(t: int) -> None:
        client = triton.InferenceServerClient(address)
        try:
            for k in range(per_thread):
                i = t * per_thread + k
                reply = _infer(client, x[i:i + 1], parameters={"precision": "FP32"})
                results[i] = (reply.as_numpy("probabilities"), reply.get_response().parameters)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
        finally:
            client.close()

    _all_at_once([lambda t=t: caller(t) for t in range(threads)])
    assert errors == []
    assert len(results) == threads * per_thread
    for i, (probs, params) in results.items():
        np.testing.assert_allclose(probs[0], expected[i], rtol=1e-4, atol=1e-6)
        assert params["cnei_front_door"].bool_param and params["cnei_precision"].string_param == "FP32"
    assert _batched_executions(mesh) > batched_before, "no batch of more than one row reached a node"
    count = threads * per_thread
    # What the door served is booked by the coordinator: statistics and metrics.
    infra.wait_until(lambda: _executions(address) - served_before >= count, 10, "statistics of the door's requests")
    assert _metric(metrics_port, "cnei_front_door_requests_total", 'model="digits",outcome="ok"') >= count
    # ... also under Triton's metric names, for dashboards and autoscalers written for Triton
    assert _metric(metrics_port, "nv_inference_count", 'model="digits",version="1"') >= count
    # ... and the batches it formed show in the coordinator's own batch histogram.
    batches, rows = (_metric(metrics_port, f"cnei_batch_size_{k}", 'model="digits"') - before
                     for k, before in zip(("count", "sum"), batches_before))
    assert rows == count and 0 < batches < count


def test_with_two_batches_in_flight_every_caller_of_every_size_gets_its_rows(door, mesh):
    """max_inflight_batches 2: a second batch overlaps the one in flight only once as big (the
    rest waits for that one's answer). Whatever the interleaving, every caller is answered, with
    its own rows, by the door."""
    _, address, _ = door
    x, _ = load_all()
    expected = _direct(mesh, x[:300])
    _apply(mesh, BatchingSpec(max_batch_size=16, max_inflight_batches=2))
    try:
        time.sleep(1.0)  # the deployment's event reaches the coordinator, which drops the door's routes
        learner = triton.InferenceServerClient(address)
        infra.wait_until(lambda: _door_served(learner, "digits", parameters={"precision": "FP32"}), 10, "the door's route under the new deployment")
        learner.close()
        results, errors = {}, []

        def caller(t: int) -> None:
            client = triton.InferenceServerClient(address)
            try:
                start = t * 30
                for k in range(10):
                    rows = 1 + (t + k) % 3  # 1, 2 or 3 rows: batches of different sizes
                    reply = _infer(client, x[start:start + rows], parameters={"precision": "FP32"})
                    results[(t, k)] = (start, rows, reply.as_numpy("probabilities"),
                                       reply.get_response().parameters["cnei_front_door"].bool_param)
                    start += rows
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                client.close()

        _all_at_once([lambda t=t: caller(t) for t in range(10)])
        assert errors == []
        assert len(results) == 100
        for start, rows, probs, by_door in results.values():
            np.testing.assert_allclose(probs, expected[start:start + rows], rtol=1e-4, atol=1e-6)
            assert by_door
    finally:
        _apply(mesh, None)



def test_a_second_batch_overlaps_the_one_in_flight_only_once_as_big(door, mesh, tmp_path):
    """A node 400 ms away (emulated ingress delay) takes region site-s's requests (placement by
    locality alone). With two batches allowed in flight, a 1-row request arriving while 3 rows are
    at the node waits for their answer before it leaves the door; 3 rows arriving then leave at
    once and overlap."""
    _, address, _ = door
    x, _ = load_all()
    node, _ = start_runtime(mesh, "edge-s9", "site-s9", tmp_path, CNEI_RUNTIME_EMULATED_DELAY_MS="400")
    _apply(mesh, BatchingSpec(max_batch_size=8, max_inflight_batches=2),
           SchedulerSpec(alpha=0.0, beta=1.0, gamma=0.0, delta=0.0, threshold=0.5))
    client = triton.InferenceServerClient(address)
    local = {"precision": "FP32", "region": "site-s9"}

    def on_the_slow_node_by_the_door() -> bool:
        params = _infer(client, x[:1], parameters=local).get_response().parameters
        return params["cnei_node"].string_param == "edge-s9" and params["cnei_front_door"].bool_param

    def finish_times(first_rows: int, second_rows: int) -> tuple[float, float]:
        """Send `first_rows`, then 100 ms later `second_rows`; when each was answered."""
        done, t0 = {}, time.perf_counter()

        def send(name: str, rows: int, after_s: float) -> None:
            time.sleep(after_s)
            own = triton.InferenceServerClient(address)
            try:
                _infer(own, x[:rows], parameters=local)
                done[name] = time.perf_counter() - t0
            finally:
                own.close()

        _all_at_once([lambda: send("first", first_rows, 0.0), lambda: send("second", second_rows, 0.1)])
        return done["first"], done["second"]

    try:
        infra.wait_until(on_the_slow_node_by_the_door, 30, "site-s9's requests on edge-s9 through the door")
        first, second = finish_times(3, 1)
        assert second >= first + 0.3, f"1 row overlapped a batch of 3: answered {second - first:.3f} s after it"
        first, second = finish_times(3, 3)
        assert second < first + 0.3, f"3 rows waited for a batch of 3: answered {second - first:.3f} s after it"
    finally:
        client.close()
        _apply(mesh, None)
        infra.stop(node)

def _rows_run(mesh) -> int:
    return sum(_executions(mesh.runtime(node_id)) for node_id, _, _ in RUNTIMES)


def _door_served(client, model: str, **kwargs) -> bool:
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    reply = client.infer(model, [tensor], client_timeout=30, **kwargs)
    return reply.get_response().parameters["cnei_front_door"].bool_param


def _refused_as_unloaded(client, model: str) -> None:
    with pytest.raises(triton_utils.InferenceServerException, match="is unloaded") as refused:
        _door_served(client, model)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


def _apply(mesh, batching: BatchingSpec | None, scheduler: SchedulerSpec | None = None) -> None:
    put_deployment(mesh, DeploymentSpec(model="digits", batching=batching or BatchingSpec(),
                                        scheduler=scheduler or SchedulerSpec()))


def _all_at_once(calls: list) -> None:
    """Run each zero-argument callable on its own thread, all started before any is joined."""
    threads = [threading.Thread(target=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _wait_held(address: str, delay_s: float, timeout: float, **kwargs) -> None:
    """Until a lone request of one route (`kwargs`: its parameters) is held for the queue delay:
    the coordinator drops its cached deployment on the registry's event and the door's route
    follows when it is next refreshed."""
    x, _ = load_all()
    client = triton.InferenceServerClient(address)

    def held() -> bool:
        t0 = time.perf_counter()
        _infer(client, x[:1], **kwargs)
        return time.perf_counter() - t0 >= delay_s

    try:
        infra.wait_until(held, timeout, f"the door's route to carry the {delay_s:g} s queue delay")
    finally:
        client.close()


def _timed_together(address: str, rows: list[np.ndarray]) -> list[tuple[float, object]]:
    """Send one request per row at the same moment; (seconds, reply) for each."""
    start, out, errors = threading.Barrier(len(rows)), [None] * len(rows), []

    def one(i: int) -> None:
        client = triton.InferenceServerClient(address)
        try:
            start.wait()
            t0 = time.perf_counter()
            reply = _infer(client, rows[i][None, :], parameters={"precision": "FP32"})
            out[i] = (time.perf_counter() - t0, reply)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    _all_at_once([lambda i=i: one(i) for i in range(len(rows))])
    assert errors == []
    return out


def test_the_door_holds_batches_for_the_deployment_s_queue_delay_and_releases_a_preferred_size(steady_door, mesh):
    _, address, _ = steady_door
    x, y = load_all()
    delay_s = 0.3
    _apply(mesh, BatchingSpec(max_batch_size=64, max_queue_delay_us=int(delay_s * 1e6)))
    try:
        _wait_held(address, delay_s, 15, parameters={"precision": "FP32"})
        (seconds, reply), = _timed_together(address, [x[1]])
        assert seconds >= delay_s, "a lone request left before its queue delay"
        assert reply.get_response().parameters["cnei_front_door"].bool_param
        assert reply.as_numpy("probabilities")[0].argmax() == y[1]

        before, batched_before = _rows_run(mesh), _batched_executions(mesh)
        replies = _timed_together(address, list(x[10:18]))
        assert [r.as_numpy("probabilities")[0].argmax() for _, r in replies] == list(y[10:18])
        assert _batched_executions(mesh) > batched_before, "requests inside one queue delay were not batched"
        assert _rows_run(mesh) - before == 8

        # A preferred batch size leaves at once, long before the (now 1.5 s: within the
        # deployment's 2 s attempt timeout) delay.
        _apply(mesh, BatchingSpec(max_batch_size=64, max_queue_delay_us=1_500_000, preferred_batch_sizes=(4,)))
        _wait_held(address, 1.5, 20, parameters={"precision": "FP32"})
        replies = _timed_together(address, list(x[20:24]))
        assert max(seconds for seconds, _ in replies) < 1.0, "a batch of a preferred size waited out the delay"
        assert [r.as_numpy("probabilities")[0].argmax() for _, r in replies] == list(y[20:24])
        client = triton.InferenceServerClient(address)  # the rules in force, as Triton's config shows them
        try:
            batching = client.get_model_config("digits").config.dynamic_batching
        finally:
            client.close()
        assert (list(batching.preferred_batch_size), batching.max_queue_delay_microseconds) == ([4], 1_500_000)
    finally:
        _apply(mesh, None)


def test_priority_and_timeout_requests_are_served_by_the_door_and_a_timeout_ends_in_its_queue(door, mesh):
    _, address, _ = door
    x, y = load_all()
    client = triton.InferenceServerClient(address)
    try:
        for i, kwargs in enumerate([{"priority": 1}, {"priority": 9, "timeout": 5_000_000},
                                    {"parameters": {"timeout_us": 5_000_000}}]):
            infra.wait_until(lambda: "cnei_front_door" in _infer(client, x[i:i + 1], **kwargs).get_response().parameters,
                             10, f"a route for requests with {kwargs}")
            reply = _infer(client, x[i:i + 1], **kwargs)
            assert reply.get_response().parameters["cnei_front_door"].bool_param
            assert reply.as_numpy("probabilities").argmax() == y[i]

        # Held by a 1 s queue delay, a request with tritonclient's timeout of 150 ms fails when its
        # timeout passes, in the door's queue, and is never sent.
        _apply(mesh, BatchingSpec(max_batch_size=64, max_queue_delay_us=1_000_000))
        try:
            _wait_held(address, 1.0, 15)  # the route of the request below (a timeout is not in the key)
            before = _rows_run(mesh)
            started = time.perf_counter()
            with pytest.raises(triton_utils.InferenceServerException) as failed:
                _infer(client, x[:1], timeout=150_000)
            waited = time.perf_counter() - started
            assert failed.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            assert "front door" in failed.value.message()
            assert 0.15 <= waited < 0.9, f"the timeout ended the wait after {waited:.3f} s"
            time.sleep(1.2)  # past the delay: had it been queued still, it would have been sent
            assert _rows_run(mesh) == before
        finally:
            _apply(mesh, None)
    finally:
        client.close()


def test_a_more_urgent_request_leaves_the_door_s_queue_first(steady_door, mesh):
    """Held by a queue delay, 3 rows of the default level wait; 2 rows at priority 1 arrive and
    would overfill max_batch_size 4 together with them: the urgent rows leave at once, alone.
    (In arrival order the 3 rows would leave then and the 2 urgent ones wait out their delay.)"""
    _, address, _ = steady_door
    x, y = load_all()
    delay_s = 0.6
    _apply(mesh, BatchingSpec(max_batch_size=4, max_queue_delay_us=int(delay_s * 1e6)))
    try:
        _wait_held(address, delay_s, 15)  # the route of the requests below (batch size is not in the key)
        done: dict[str, tuple[float, object]] = {}

        def send(name: str, rows: slice, after_s: float, **kwargs) -> None:
            time.sleep(after_s)
            own = triton.InferenceServerClient(address)
            try:
                t0 = time.perf_counter()
                reply = _infer(own, x[rows], **kwargs)
                done[name] = (time.perf_counter() - t0, reply)
            finally:
                own.close()

        _all_at_once([lambda: send("default", slice(0, 3), 0.0),
                      lambda: send("urgent", slice(3, 5), 0.15, priority=1)])
        assert set(done) == {"default", "urgent"}
        assert done["urgent"][0] < 0.3, f"the urgent rows waited {done['urgent'][0]:.3f} s"
        assert done["default"][0] >= delay_s - 0.05, f"the default rows left after {done['default'][0]:.3f} s"
        for name, rows in (("default", slice(0, 3)), ("urgent", slice(3, 5))):
            reply = done[name][1]
            assert reply.get_response().parameters["cnei_front_door"].bool_param
            assert list(reply.as_numpy("probabilities").argmax(axis=1)) == list(y[rows])
    finally:
        _apply(mesh, None)


DROPPED_FULL = 'model="digits",reason="queue_full"'
# the full path books a failure against no version, precision, node or tier
REFUSED_FULL = 'model="digits",node="",outcome="resource_exhausted",precision="",tier="",version=""'


def test_a_full_door_queue_answers_resource_exhausted_and_keeps_what_it_holds(steady_door, mesh):
    """max_queue_size 2 and a 1 s queue delay: of five requests sent together, two wait and are
    answered, three are refused at once with RESOURCE_EXHAUSTED; nothing is lost. The coordinator
    counts the three in cnei_batch_dropped_total and against no node."""
    _, address, metrics_port = steady_door
    x, y = load_all()
    _apply(mesh, BatchingSpec(max_batch_size=64, max_queue_delay_us=1_000_000, max_queue_size=2))
    try:
        _wait_held(address, 1.0, 15, parameters={"precision": "FP32"})
        before = (_metric(metrics_port, "cnei_batch_dropped_total", DROPPED_FULL),
                  _metric(metrics_port, "cnei_coordinator_requests_total", REFUSED_FULL))
        answered, refused, other = [], [], []

        def one(i: int) -> None:
            client = triton.InferenceServerClient(address)
            try:
                t0 = time.perf_counter()
                reply = _infer(client, x[i:i + 1], parameters={"precision": "FP32"})
                answered.append((i, time.perf_counter() - t0, reply.as_numpy("probabilities")[0].argmax()))
            except triton_utils.InferenceServerException as exc:
                (refused if exc.status() == "StatusCode.RESOURCE_EXHAUSTED" else other).append(
                    (i, time.perf_counter() - t0, exc.message()))
            finally:
                client.close()

        _all_at_once([lambda i=i: one(i) for i in range(5)])
        assert other == []
        assert (len(answered), len(refused)) == (2, 3)
        assert all(y[i] == label for i, _, label in answered)
        assert all(seconds < 0.5 and "is full (2 requests)" in message for _, seconds, message in refused)
        infra.wait_until(lambda: (_metric(metrics_port, "cnei_batch_dropped_total", DROPPED_FULL) - before[0],
                                  _metric(metrics_port, "cnei_coordinator_requests_total", REFUSED_FULL) - before[1])
                         == (3, 3), 5, "the door's report of its refusals booked")
    finally:
        _apply(mesh, None)


def test_a_door_queue_full_of_one_priority_level_still_takes_more_urgent_requests(steady_door, mesh):
    """max_queue_size 2 bounds each priority level (Triton's queue policy per level) and a 1 s
    queue delay holds them: two rows at priority 5 fill theirs; two at priority 1 still queue and
    are answered, a third at priority 5 is refused at once with RESOURCE_EXHAUSTED."""
    _, address, _ = steady_door
    x, y = load_all()
    _apply(mesh, BatchingSpec(max_batch_size=64, max_queue_delay_us=1_000_000, max_queue_size=2))
    try:
        _wait_held(address, 1.0, 15, parameters={"precision": "FP32"})
        outcomes: dict[int, object] = {}

        def one(i: int, priority: int, after_s: float) -> None:
            time.sleep(after_s)
            client = triton.InferenceServerClient(address)
            try:
                reply = _infer(client, x[i:i + 1], priority=priority, parameters={"precision": "FP32"})
                outcomes[i] = int(reply.as_numpy("probabilities")[0].argmax())
            except triton_utils.InferenceServerException as exc:
                outcomes[i] = (exc.status(), exc.message())
            finally:
                client.close()

        _all_at_once([lambda: one(0, 5, 0.0), lambda: one(1, 5, 0.0), lambda: one(2, 1, 0.2),
                      lambda: one(3, 1, 0.2), lambda: one(4, 5, 0.4)])
        assert {i: outcomes[i] for i in range(4)} == {i: int(y[i]) for i in range(4)}
        status, message = outcomes[4]
        assert status == "StatusCode.RESOURCE_EXHAUSTED" and message.endswith("is full (2 requests) at priority 5")
    finally:
        _apply(mesh, None)


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"parameters": {"cnei_note": "x"}}, "parameters the door does not know are the coordinator's"),
    ({"headers": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}},
     "a sampled trace is recorded hop by hop")],
    ids=["unknown-parameter", "sampled-trace"])
def test_requests_a_route_cannot_serve_take_the_coordinator_s_full_path(door, kwargs, why):
    _, address, _ = door
    x, y = load_all()
    client = triton.InferenceServerClient(address)
    try:
        for i in range(3):
            reply = _infer(client, x[i:i + 1], **kwargs)
            assert "cnei_front_door" not in reply.get_response().parameters, why
            assert reply.as_numpy("probabilities").argmax() == y[i]
    finally:
        client.close()


def test_every_other_rpc_passes_through_the_door_unchanged(door):
    _, address, _ = door
    client = triton.InferenceServerClient(address)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata().name == "cnei-coordinator"
        assert client.get_model_metadata("digits").inputs[0].name == "input"
        assert client.get_model_config("digits").config.max_batch_size > 0
        assert "digits" in {m.name for m in client.get_model_repository_index().models}
        with pytest.raises(triton_utils.InferenceServerException, match="not found"):
            client.get_model_metadata("no-such-model")
    finally:
        client.close()
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


CONTROL = "cnei.frontdoor.v1.FrontDoorControl"
FORGED_ROUTES = range(1, 4097)  # every route id a coordinator hands out first (they count from 1)


def _forged_report() -> fd.FrontDoorReport:
    """A report that, booked, would add a thousand requests to every route's model."""
    return fd.FrontDoorReport(routes=[fd.RouteReport(route_id=i, request_ns=[10**6] * 1000, request_rows=[1] * 1000)
                                      for i in FORGED_ROUTES])


def _successes(client) -> int:
    return sum(s.inference_stats.success.count for s in client.get_inference_statistics("digits").model_stats)


def _control_request(method: str):
    if method == "Report":
        return _forged_report()
    ask = pb.ModelInferRequest(model_name="digits", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[1, 64])])
    return fd.RouteRequest(infer_request=ask.SerializeToString())


def _refusal(address: str, service: str, method: str, streamed: bool) -> grpc.RpcError:
    """How `service`'s `method` called at `address` with the control service's request fails,
    unary or as a stream (on the wire no different)."""
    request = _control_request(method)
    path, serializer = f"/{service}/{method}", type(request).SerializeToString
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
        if streamed:
            list(channel.stream_stream(path, request_serializer=serializer)(iter([request]), timeout=10))
        else:
            channel.unary_unary(path, request_serializer=serializer)(request, timeout=10)
    return refused.value


@pytest.mark.parametrize("method", ["Route", "Report"])
@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "streamed"])
def test_the_door_s_control_service_is_unimplemented_at_its_public_port_and_books_nothing(door, method, streamed):
    _, address, _ = door
    x, _ = load_all()
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(lambda: "cnei_front_door" in _infer(client, x[:1]).get_response().parameters, 15,
                         "the door serving digits")
        time.sleep(0.5)  # the door's own report of those requests is in
        before = _successes(client)
        refused = _refusal(address, CONTROL, method, streamed)
        time.sleep(0.5)
        after = _successes(client)
    finally:
        client.close()
    unknown = _refusal(address, "cnei.nothing.v1.Nothing", method, streamed)
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
    assert refused.details() == unknown.details()  # as if there were no such service
    assert after == before


def test_streamed_inference_passes_through_the_door(door):
    _, address, _ = door
    x, y = load_all()
    replies, done = [], threading.Event()

    def on_reply(result, error):
        replies.append((result, error))
        if len(replies) == 3:
            done.set()

    client = triton.InferenceServerClient(address)
    try:
        client.start_stream(callback=on_reply)
        for i in range(3):
            tensor = triton.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(x[i:i + 1])
            client.async_stream_infer("digits", [tensor], request_id=str(i))
        assert done.wait(30)
        client.stop_stream()
    finally:
        client.close()
    assert [e for _, e in replies] == [None] * 3
    assert {r.get_response().id: int(r.as_numpy("probabilities").argmax()) for r, _ in replies} == \
        {str(i): int(y[i]) for i in range(3)}


@pytest.mark.parametrize(("shape", "raw_bytes", "code", "message"), [
    ([1, 63], 63 * 4, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    ([1, 64], 10, grpc.StatusCode.INVALID_ARGUMENT, "input"),
    ([1, 64], 64 * 4, grpc.StatusCode.NOT_FOUND, "no-such-model")],
    ids=["wrong-shape", "short-raw-contents", "unknown-model"])
def test_a_bad_request_gets_the_coordinator_s_clear_status_through_the_door(door, shape, raw_bytes, code, message):
    _, address, _ = door
    request = pb.ModelInferRequest(model_name="no-such-model" if code == grpc.StatusCode.NOT_FOUND else "digits")
    request.inputs.add(name="input", datatype="FP32", shape=shape)
    request.raw_input_contents.append(bytes(raw_bytes))
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert caught.value.code() == code
    assert message in caught.value.details()


@pytest.mark.parametrize("field", [("int64_param", -1), ("double_param", 1.7)], ids=["negative", "fraction"])
def test_a_priority_that_is_no_uint64_is_invalid_argument_naming_it_through_the_door(door, field):
    _, address, _ = door
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(bytes(64 * 4))
    setattr(request.parameters["priority"], *field)
    client = triton.InferenceServerClient(address)
    try:  # the route of the request (its priority is not in the key) is the door's
        infra.wait_until(lambda: _door_served(client, "digits"), 15, "the door serving digits")
    finally:
        client.close()
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"parameter 'priority' must be an integer from 0 to {2 ** 64 - 1}, got {field[1]}" in caught.value.details()


def test_one_kind_of_request_is_spread_over_every_node_as_good_as_the_best(steady_door, mesh, tmp_path):
    """Two fresh edge nodes in one region: the route names both (edgeai policy; the cloud and
    other sites stay failover targets), and under concurrent load the door sends requests to both
    within one route lifetime (5 s here), rather than to one node until the route is next
    refreshed."""
    _, address, _ = steady_door
    nodes = [start_runtime(mesh, node_id, "site-m", tmp_path)[0] for node_id in ("edge-m1", "edge-m2")]
    try:
        time.sleep(1.5)  # the coordinator sees both nodes
        with Load(address, threads=2, region="site-m") as first:
            time.sleep(0.3)  # the door learns the route (requests before that take the coordinator's path)
        with Load(address, threads=8, region="site-m") as load:
            time.sleep(2.0)
    finally:
        for proc in nodes:
            infra.stop(proc)
    assert first.errors == load.errors == [], f"failed requests: {(first.errors + load.errors)[:3]}"
    served = collections.Counter(node for _, _, node in load.results)
    assert set(served) == {"edge-m1", "edge-m2"}, f"served by {dict(served)}"
    assert min(served.values()) >= len(load.results) // 10, f"lopsided: {dict(served)}"


def test_under_a_canary_each_version_is_spread_over_every_node_as_good_as_the_best(steady_door, mesh, tmp_path,
                                                                                   digits_models):
    """A canary rollout splits requests between the versions by share, and each version's share
    is spread over the version's peer nodes as any route is (not sent to its best node alone)."""
    _, address, _ = steady_door
    model = "digits-canary-spread"
    for version in ("1", "2"):
        push_digits_as(mesh, digits_models, model, version)
    nodes = [start_runtime(mesh, node_id, "site-n", tmp_path)[0] for node_id in ("edge-n1", "edge-n2")]
    try:
        time.sleep(1.5)  # the coordinator sees both nodes
        # the canary is pushed to every node (the new ones too: else the nodes that hold it win it)
        put_deployment(mesh, DeploymentSpec(model=model, rollout=RolloutSpec(stable="1", canary="2",
                                                                             canary_percent=50)))
        time.sleep(1.0)
        with Load(address, threads=2, region="site-n", model=model) as first:
            time.sleep(0.5)  # the door learns the split route; both versions load on both nodes
        with Load(address, threads=8, region="site-n", model=model) as load:
            time.sleep(2.0)
    finally:
        for proc in nodes:
            infra.stop(proc)
        put_deployment(mesh, DeploymentSpec(model=model))
    assert first.errors == load.errors == [], f"failed requests: {(first.errors + load.errors)[:3]}"
    served = load.served
    assert set(served) == {(v, n) for v in ("1", "2") for n in ("edge-n1", "edge-n2")}, f"served {dict(served)}"
    total = sum(served.values())
    canary = served[("2", "edge-n1")] + served[("2", "edge-n2")]
    assert 0.3 * total <= canary <= 0.7 * total, f"canary share off: {dict(served)}"


def test_a_node_killed_under_load_behind_the_door_loses_no_request(door, mesh, tmp_path):
    _, address, metrics_port = door
    victim, _ = start_runtime(mesh, "edge-d1", "site-d", tmp_path)
    try:
        handed_before = _metric(metrics_port, "cnei_front_door_requests_total", 'model="digits",outcome="handed_over"')
        load, served_by_victim, killed_at = kill_under_load(address, victim, "edge-d1", "site-d", 2.0, 3.0)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert served_by_victim > 0, "the victim never took traffic; the test proves nothing"
    assert load.errors == [], f"{len(load.errors)} failed requests: {load.errors[:3]}"
    after = [r for r in load.results if r[0] >= killed_at + 1.0]
    assert after and all(node != "edge-d1" for _, _, node in after)
    handed = _metric(metrics_port, "cnei_front_door_requests_total", 'model="digits",outcome="handed_over"')
    assert handed > handed_before, "no request was in the door's hands when the node died"


def test_a_model_unloaded_through_the_door_or_beside_it_is_never_served_from_an_old_route(mesh, digits_models):
    """Unloading through the door's port, or beside it (REST, straight to the coordinator), drops
    the door's routes of that model before the unload is answered: the door never serves an
    unloaded model from a route learnt before, not even a moment after. A load likewise drops
    them (the door then asks for the model's route again)."""
    model = push_digits_as(mesh, digits_models, "digits-door-ctl")
    proc, address, http_port, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="on")
    client = triton.InferenceServerClient(address)
    rest = triton_http.InferenceServerClient(f"127.0.0.1:{http_port}")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready behind its door")
        infra.wait_until(lambda: _door_served(client, model), 10, "the door serving the model")
        client.unload_model(model)
        for _ in range(3):  # at once: no sleep for a route to expire
            _refused_as_unloaded(client, model)
        client.load_model(model)
        infra.wait_until(lambda: _door_served(client, model), 10, "the door serving the reloaded model")
        rest.unload_model(model)
        for _ in range(3):  # at once: the coordinator answered once its door had dropped the routes
            _refused_as_unloaded(client, model)
        rest.load_model(model)
        infra.wait_until(lambda: _door_served(client, model), 10, "the door serving it again")
    finally:
        client.close()
        infra.stop(proc)


def test_sigterm_stops_the_door_and_the_coordinator(door):
    proc, address, _ = door
    doors = children(proc.pid)
    assert doors, "the coordinator runs no front door process"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    for pid in doors:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_with_spans_exported_one_request_in_n_takes_the_traced_full_path(mesh, jaeger):
    proc, address, _ = start_door(mesh, OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp,
                                          CNEI_COORDINATOR_TRACE_RATE="4")
    x, _ = load_all()
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(lambda: "cnei_front_door" in _infer(client, x[:1]).get_response().parameters,
                         10, "a request answered by the door")
        started_us = time.time() * 1e6
        door_answered = sum("cnei_front_door" in _infer(client, x[i:i + 1]).get_response().parameters
                            for i in range(16))
    finally:
        client.close()
        infra.stop(proc)
    assert door_answered == 12  # requests 4, 8, 12 and 16 of the route took the full path

    def traced() -> int:
        traces = jaeger.get("/api/traces?service=cnei-coordinator&limit=500")["data"] or []
        return sum(1 for t in traces if any(s["operationName"].endswith("ModelInfer") and s["startTime"] >= started_us
                                            and t["processes"][s["processID"]]["serviceName"] == "cnei-coordinator"
                                            for s in t["spans"]))
    infra.wait_until(lambda: traced() >= 4, 10, "traces of the full-path requests")


def test_a_coordinator_killed_with_sigkill_takes_its_door_along_and_frees_the_port(mesh):
    proc, address, _ = start_door(mesh)
    try:
        doors = children(proc.pid)
        assert doors, "the coordinator runs no front door process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        infra.wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in doors), 10, "the door to exit")
        host, port = address.rsplit(":", 1)
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=1).close()
    finally:
        infra.stop(proc)

