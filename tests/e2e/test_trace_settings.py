"""Triton's trace extension (tritonclient `update_trace_settings` / `get_trace_settings`, gRPC
and REST) decides which requests that come without trace context start traces: through the
front door (it sends one request in `trace_rate` of a route to the coordinator's traced path),
on the coordinator's own path, and on an edge runtime called directly. Traces land in the
Jaeger stand-in."""
from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.coordinator.door_process import BUILT
from tests.e2e.processes import rest_json, server_ready, start_coordinator


def _infer(client) -> bool:
    """One digits request; whether the front door answered it."""
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    return "cnei_front_door" in client.infer("digits", [tensor], client_timeout=30).get_response().parameters


def _traces(jaeger, service: str, since_us: float) -> int:
    """Traces holding a ModelInfer server span of `service` that started after `since_us`."""
    traces = jaeger.get(f"/api/traces?service={service}&limit=1000")["data"] or []
    return sum(1 for t in traces if any(
        s["operationName"].endswith("ModelInfer") and s["startTime"] >= since_us
        and t["processes"][s["processID"]]["serviceName"] == service and not s.get("references")
        for s in t["spans"]))


def _settled(jaeger, service: str, since_us: float, at_least: int) -> int:
    """The trace count once the ones expected are in and a moment more brought none."""
    infra.wait_until(lambda: _traces(jaeger, service, since_us) >= at_least, 15, f"{at_least} traces of {service}")
    time.sleep(1.0)  # spans leave in batches: any extra one would be in by now
    return _traces(jaeger, service, since_us)


def _await_route_refresh(client) -> None:
    """The door asks for a stale route (100 ms ttl) when a request comes, and uses the old one
    until the answer is in: one request, then a moment."""
    time.sleep(0.2)
    _infer(client)
    time.sleep(0.3)


def _settings(response) -> dict[str, list[str]]:
    return {name: list(value.value) for name, value in response.settings.items()}


def _rest(port: int, path: str, body: object | None = None) -> tuple[int, dict]:
    return rest_json(f"http://127.0.0.1:{port}{path}", "GET" if body is None else "POST", body)


@pytest.fixture
def coordinator(mesh, jaeger, request):
    """A coordinator of its own exporting spans, with trace level OFF; `request.param`: its door."""
    proc, address, http_port, _ = start_coordinator(
        mesh, OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp, CNEI_COORDINATOR_FRONT_DOOR=request.param,
        CNEI_COORDINATOR_TRACE_LEVEL="OFF")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        yield address, http_port
    finally:
        infra.stop(proc)


@pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")
@pytest.mark.parametrize("coordinator", ["on"], indirect=True)
def test_trace_settings_through_the_door_sample_one_in_rate_while_the_count_lasts(coordinator, jaeger):
    address, http_port = coordinator
    client = triton.InferenceServerClient(address)
    try:
        assert "trace" in client.get_server_metadata().extensions
        assert _settings(client.get_trace_settings()) == {
            "trace_level": ["OFF"], "trace_rate": ["1"], "trace_count": ["-1"], "log_frequency": ["0"],
            "trace_file": [""], "trace_mode": ["opentelemetry"]}
        infra.wait_until(lambda: _infer(client), 10, "a request answered by the door")
        started = time.time() * 1e6
        assert all(_infer(client) for _ in range(8))  # level OFF: the door answers every request

        updated = _settings(client.update_trace_settings(
            "digits", {"trace_level": ["TIMESTAMPS"], "trace_rate": "4", "trace_count": "3"}))
        assert (updated["trace_level"], updated["trace_rate"], updated["trace_count"]) == (["TIMESTAMPS"], ["4"], ["3"])
        assert _settings(client.get_trace_settings())["trace_level"] == ["OFF"]  # the global ones stay
        _await_route_refresh(client)
        door_answered = sum(_infer(client) for _ in range(16))
        # one in four took the coordinator's path (the fourth may not: once the count is spent, the
        # door's next route refresh stops sending requests there) ...
        assert 16 - door_answered in (3, 4)
        assert _settled(jaeger, "cnei-coordinator", started, 3) == 3  # ... and three traces were left
        assert _settings(client.get_trace_settings("digits"))["trace_count"] == ["0"]
        _await_route_refresh(client)
        assert all(_infer(client) for _ in range(8))  # none left: the door answers every request again

        status, body = _rest(http_port, "/v2/models/digits/trace/setting")
        assert status == 200 and body["trace_count"] == ["0"] and body["trace_rate"] == ["4"]
        rest = http.InferenceServerClient(f"127.0.0.1:{http_port}")
        try:
            cleared = rest.update_trace_settings("digits", {"trace_rate": None, "trace_count": None})
            assert cleared["trace_rate"] == ["1"] and cleared["trace_count"] == ["-1"]  # the global ones again
            assert rest.get_trace_settings()["trace_level"] == ["OFF"]
        finally:
            rest.close()
    finally:
        client.close()


@pytest.mark.parametrize("coordinator", ["off"], indirect=True)
def test_the_coordinators_own_path_samples_too_and_bad_settings_get_clear_errors(coordinator, jaeger):
    address, http_port = coordinator
    client = triton.InferenceServerClient(address)
    try:
        client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "3"})
        started = time.time() * 1e6
        for _ in range(9):
            _infer(client)
        assert _settled(jaeger, "cnei-coordinator", started, 3) == 3

        for settings, wanted in [({"trace_level": ["TENSORS"]}, "trace level TENSORS is not offered"),
                                 ({"trace_rate": "0"}, "must be an integer of at least 1"),
                                 ({"trace_file": "/tmp/trace.json"}, "Triton's file trace mode")]:
            with pytest.raises(InferenceServerException, match=wanted) as caught:
                client.update_trace_settings(settings=settings)
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException, match="no-such-model") as caught:
            client.get_trace_settings("no-such-model")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()
    status, body = _rest(http_port, "/v2/trace/setting", {"trace_level": "SOMETIMES"})
    assert status == 400 and "trace level SOMETIMES is not offered" in body["error"]
    status, body = _rest(http_port, "/v2/trace/setting", ["trace_rate"])
    assert status == 400 and "JSON object" in body["error"]
    assert _rest(http_port, "/v2/models/no-such-model/trace/setting")[0] == 404


@pytest.mark.parametrize("coordinator", ["off"], indirect=True)
def test_clearing_a_global_setting_gives_back_the_coordinators_configured_one(coordinator):
    address, http_port = coordinator
    grpc_client = triton.InferenceServerClient(address)
    rest_client = http.InferenceServerClient(f"127.0.0.1:{http_port}")
    try:
        grpc_client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "7", "trace_count": "4"})
        cleared = _settings(grpc_client.update_trace_settings(settings={"trace_level": None, "trace_rate": None}))
        assert (cleared["trace_level"], cleared["trace_rate"], cleared["trace_count"]) == (["OFF"], ["1"], ["4"])
        cleared = rest_client.update_trace_settings(settings={"trace_count": None})
        assert (cleared["trace_level"], cleared["trace_rate"], cleared["trace_count"]) == (["OFF"], ["1"], ["-1"])
    finally:
        rest_client.close()
        grpc_client.close()


def test_an_edge_runtime_called_directly_has_trace_settings_of_its_own(mesh, jaeger):
    client = triton.InferenceServerClient(mesh.runtime("edge-a1"))
    try:
        client.update_trace_settings("digits", {"trace_rate": "2"})
        started = time.time() * 1e6
        for _ in range(4):
            _infer(client)
        assert _settled(jaeger, "cnei-runtime-edge", started, 2) == 2
        logs = client.get_log_settings(as_json=True)["settings"]  # the logging extension too
        assert logs["log_info"]["bool_param"] is True and logs["log_format"]["string_param"] == "default"
    finally:
        client.update_trace_settings("digits", {"trace_rate": None})
        client.close()


def test_with_redis_away_a_coordinator_serves_its_configured_settings_and_says_why_they_cannot_change(mesh):
    proc, address, http_port, _ = start_coordinator(
        mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="off", CNEI_COORDINATOR_TRACE_RATE="9",
        CNEI_COORDINATOR_REDIS_URL=f"redis://127.0.0.1:{infra.free_port()}/0")  # nothing listens there
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(client.is_server_live, 30, "the coordinator live")
        assert _settings(client.get_trace_settings())["trace_rate"] == ["9"]
        assert client.get_log_settings(as_json=True)["settings"]["log_info"]["bool_param"] is True
        for change in (lambda: client.update_trace_settings(settings={"trace_rate": "2"}),
                       lambda: client.update_log_settings({"log_verbose_level": 1})):
            with pytest.raises(InferenceServerException, match="kept in Redis, which does not answer") as caught:
                change()
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        client.close()
        infra.stop(proc)
