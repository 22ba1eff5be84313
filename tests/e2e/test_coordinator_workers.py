"""Several coordinator processes on one port: requests spread over them, /metrics adds them up,
a crashed worker is replaced and SIGTERM stops them all."""
from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils as triton_utils

from services.cli import infra
from services.models.digits import load_all
from tests.e2e.processes import children, start_coordinator

WORKERS = 2


def _infer_fresh_connection(address: str, x: np.ndarray) -> tuple[np.ndarray, int]:
    """One request over a new connection (the kernel spreads connections across workers):
    (probabilities, index of the worker that answered)."""
    client = triton.InferenceServerClient(address)
    try:
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("digits", [inp], client_timeout=30)
        worker = result.get_response().parameters["cnei_coordinator_worker"].int64_param
        return result.as_numpy("probabilities"), worker
    finally:
        client.close()


def _inferences(address: str) -> int:
    client = triton.InferenceServerClient(address)  # a new connection: any worker
    try:
        return sum(s.inference_count for s in client.get_inference_statistics("digits").model_stats)
    finally:
        client.close()


OIP_OK = r'^cnei_inference_requests_total\{model="digits",outcome="ok"\} (\S+)'
TRITON_SUCCESS = r'^nv_inference_request_success\{model="digits",version="1"\} (\S+)'


def _requests_total(metrics_port: int, pattern: str = OIP_OK) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.findall(pattern, text, re.M)
    return float(found[0]) if found else 0.0


@contextlib.contextmanager
def _workers(mesh):
    """A coordinator of WORKERS workers, every one of them answering: (process, gRPC address,
    REST port, metrics port); stopped at the end."""
    proc, address, http_port, metrics_port = start_coordinator(
        mesh, CNEI_COORDINATOR_WORKERS=str(WORKERS), CNEI_COORDINATOR_FRONT_DOOR="off")
    try:
        infra.wait_for_port("127.0.0.1", http_port, proc=proc, timeout=60)
        infra.wait_until(lambda: len(children(proc.pid)) == WORKERS, 30, f"{WORKERS} workers")
        # started is not yet listening (a busy machine): every worker answers before the test
        seen, x = set(), load_all()[0][:1]
        infra.wait_until(lambda: seen.add(_infer_fresh_connection(address, x)[1]) or seen == set(range(WORKERS)),
                         30, "every worker answering on the shared port")
        yield proc, address, http_port, metrics_port
    finally:
        infra.stop(proc)


@pytest.fixture(scope="module")
def workers(mesh):
    """One coordinator with workers for the tests that leave it running: they count what they
    send from what was counted before, and the one changing its log settings sets them back."""
    with _workers(mesh) as running:
        yield running


@pytest.fixture
def workers_to_stop(mesh):
    """A coordinator with workers of the test's own, which it kills or stops."""
    with _workers(mesh) as running:
        yield running


def test_every_worker_answers_statistics_for_a_model_it_has_not_served_yet(workers):
    """perf_analyzer asks for statistics on a connection of its own, which may land on a worker
    that served none of its requests; Triton answers zeros for a known model, so must we."""
    _, address, _, _ = workers
    for _ in range(8):  # fresh connections: both workers are asked
        client = triton.InferenceServerClient(address)
        try:
            stats = client.get_inference_statistics("digits").model_stats
            assert stats and stats[0].name == "digits" and stats[0].version
            everything = {s.name for s in client.get_inference_statistics().model_stats}
            assert "digits" in everything  # listed by every worker, served or not
            with pytest.raises(triton_utils.InferenceServerException, match="not found"):
                client.get_inference_statistics("no-such-model")
        finally:
            client.close()


def test_workers_share_the_port_and_their_metrics_add_up(workers):
    proc, address, http_port, metrics_port = workers
    x, y = load_all()
    _infer_fresh_connection(address, x[:1])
    before = _requests_total(metrics_port)
    triton_before = _requests_total(metrics_port, TRITON_SUCCESS)
    count, answered_by, correct = 60, set(), 0
    for i in range(count):
        probs, worker = _infer_fresh_connection(address, x[i:i + 1])
        assert probs.shape == (1, 10)
        correct += int(probs.argmax() == y[i])
        answered_by.add(worker)
    assert correct >= count - 3
    assert answered_by == set(range(WORKERS))
    infra.wait_until(lambda: _requests_total(metrics_port) - before >= count, 10, "summed request count")
    # Triton's metric names, summed over the workers' shared statistics
    infra.wait_until(lambda: _requests_total(metrics_port, TRITON_SUCCESS) - triton_before >= count, 10,
                     "nv_inference_request_success over every worker")
    # Triton statistics add up too: whoever is asked reports every request once the workers'
    # books are shared (each writes its own every 0.1 s; fresh connections reach either worker).
    def all_counted() -> bool:
        seen = {_inferences(address) for _ in range(6)}
        return len(seen) == 1 and min(seen) >= count
    infra.wait_until(all_counted, 10, "statistics of every request, from any worker")
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5) as reply:
        assert reply.status == 200


def _status_page_successes(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/status", timeout=10) as reply:
        return sum(row["success"] for row in json.loads(reply.read())["stats"] if row["model"] == "digits")


def test_the_supervisors_metrics_port_answers_404_beside_slash_metrics(workers):
    """The summed /metrics of several workers is served at /metrics only, as every service's."""
    metrics_port = workers[3]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/v2/health/ready", timeout=5)
    assert refused.value.code == 404
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        assert reply.status == 200 and b"# TYPE" in reply.read()


def test_the_status_page_shows_every_workers_statistics_added_up(workers):
    """Worker 0 serves the page; the requests the other workers answered are on it too."""
    _, address, http_port, _ = workers
    x, _ = load_all()
    base = _status_page_successes(http_port)  # the fixture's requests, as far as they are shared yet
    answered_by, sent = set(), 0
    while sent < 20 or answered_by != set(range(WORKERS)):
        assert sent < 200, f"only workers {answered_by} answered"
        answered_by.add(_infer_fresh_connection(address, x[sent % 100:sent % 100 + 1])[1])
        sent += 1
    def page_adds_up() -> bool:  # every worker's requests on it: what ModelStatistics adds up
        page = _status_page_successes(http_port)
        return page >= base + sent and page == _inferences(address)
    infra.wait_until(page_adds_up, 10, f"the status page counting all {sent} requests and every worker's")


def test_trace_and_log_settings_changed_through_one_worker_are_every_workers(workers):
    _, address, http_port, _ = workers
    x, _ = load_all()
    client = triton.InferenceServerClient(address)
    try:
        client.update_log_settings({"log_verbose_level": 1, "log_warning": False})
        client.update_trace_settings("digits", {"trace_rate": "7"})
    finally:
        client.close()
    seen: dict[int, tuple] = {}
    for _ in range(40):  # fresh connections until both workers answered
        client = triton.InferenceServerClient(address)
        try:
            inp = triton.InferInput("input", [1, 64], "FP32")
            inp.set_data_from_numpy(x[:1])
            worker = client.infer("digits", [inp]).get_response().parameters["cnei_coordinator_worker"].int64_param
            logs = client.get_log_settings(as_json=True)["settings"]
            rate = client.get_trace_settings("digits").settings["trace_rate"].value
            seen[worker] = (logs["log_verbose_level"]["uint32_param"], logs["log_warning"]["bool_param"], list(rate))
        finally:
            client.close()
        if len(seen) == WORKERS:
            break
    assert seen == {w: (1, False, ["7"]) for w in range(WORKERS)}
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/logging", timeout=5) as reply:
        assert json.loads(reply.read())["log_verbose_level"] == 1
    client = triton.InferenceServerClient(address)
    try:
        with pytest.raises(triton_utils.InferenceServerException, match="log_file cannot be set") as caught:
            client.update_log_settings({"log_file": "/tmp/coordinator.log"})
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        client.update_log_settings({"log_verbose_level": 0, "log_warning": True})
    finally:
        client.close()


def test_a_crashed_worker_is_replaced_and_sigterm_stops_them_all(workers_to_stop):
    proc, address, _, _ = workers_to_stop
    x, _ = load_all()
    first = children(proc.pid)
    victim = first[0]
    os.kill(victim, 9)
    replaced = infra.wait_until(lambda: (c := children(proc.pid)) and len(c) == WORKERS and victim not in c and c,
                     30, "a replacement worker")
    assert victim not in replaced
    for i in range(10):  # whichever worker a connection lands on answers
        assert _infer_fresh_connection(address, x[i:i + 1])[0].shape == (1, 10)
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    for pid in replaced:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_workers_stop_when_their_supervisor_is_killed_with_sigkill(workers_to_stop):
    proc, address, _, _ = workers_to_stop
    worker_pids = children(proc.pid)
    assert len(worker_pids) == WORKERS
    os.kill(proc.pid, 9)
    proc.wait(timeout=10)
    infra.wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in worker_pids), 20,
                     "the workers to stop after their supervisor")
