"""Triton's restricted APIs on a coordinator, with and without its front door: calls of a
restricted category need their header (gRPC PERMISSION_DENIED, REST 403 without it), the
others stay open, and inference restricted is enforced by the door itself."""
from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.coordinator.door_process import BUILT
from tests.e2e.processes import run_cnei, server_ready, start_coordinator

ADMIN = {"admin-key": "s3cret"}
INFER = {"infer-key": "abc"}


@pytest.fixture(scope="module", params=["on", "off"])
def coordinator(mesh, request):
    """A coordinator restricting some APIs, behind its door or not, for the module: its tests
    change no setting of it (loading digits, loaded already, changes nothing)."""
    if request.param == "on" and not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    proc, address, http_port, _ = start_coordinator(
        mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR=request.param,
        CNEI_COORDINATOR_RESTRICTED_APIS="model-repository,trace,logging:admin-key=s3cret;inference:Infer-Key=abc")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        yield request.param, address, http_port
    finally:
        infra.stop(proc)


def _infer(client, headers=None):
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    return client.infer("digits", [tensor], headers=headers, client_timeout=30)


def _denied(call, category: str, header: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
    assert f"the {category} API is restricted: send header '{header}'" in caught.value.message()


def _rest(port: int, path: str, headers: dict | None = None, body: bytes = b"{}") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        assert exc.code != 403 or "restricted" in json.loads(exc.read())["error"]
        return exc.code


def test_restricted_categories_need_their_header_and_the_rest_stay_open(coordinator):
    door, address, http_port = coordinator
    client = triton.InferenceServerClient(address)
    try:
        assert client.is_server_live() and client.get_model_metadata("digits").name == "digits"  # open
        _denied(lambda: _infer(client), "inference", "infer-key")
        _denied(lambda: _infer(client, {"infer-key": "wrong"}), "inference", "infer-key")
        if door == "on":  # the door answers an allowed request itself
            infra.wait_until(lambda: "cnei_front_door" in _infer(client, INFER).get_response().parameters, 10,
                             "a request answered by the door")
        assert _infer(client, INFER).as_numpy("probabilities").shape == (1, 10)
        _denied(lambda: client.get_model_repository_index(), "model-repository", "admin-key")
        assert any(m.name == "digits" for m in client.get_model_repository_index(headers=ADMIN).models)
        _denied(lambda: client.update_trace_settings(settings={"trace_rate": "5"}), "trace", "admin-key")
        _denied(lambda: client.get_log_settings(), "logging", "admin-key")
        assert client.get_log_settings(headers=ADMIN, as_json=True)["settings"]["log_format"]["string_param"] == "default"
        assert client.get_inference_statistics("digits").model_stats  # statistics: open
    finally:
        client.close()
    assert _rest(http_port, "/v2/repository/index") == 403
    assert _rest(http_port, "/v2/repository/index", {"Admin-Key": "s3cret"}) == 200  # header names are case-blind
    assert _rest(http_port, "/v2/models/digits/infer", body=b'{"inputs": []}') == 403
    assert _rest(http_port, "/v2/models/digits/infer", INFER, body=b'{"inputs": []}') == 400  # let in, then judged


def test_the_command_line_sends_the_headers_it_is_given(coordinator):
    _, address, _ = coordinator
    unset = {"CNEI_HEADERS": None}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three commands of their own, at once
        denied = pool.submit(run_cnei, "infer", "digits", "--url", address, "--digits", "1", env=unset, timeout=60)
        served = pool.submit(run_cnei, "infer", "digits", "--url", address, "--digits", "1", "--header",
                             "infer-key=abc", env=unset, timeout=60)
        loaded = pool.submit(run_cnei, "models", "load", "digits", "--url", address,
                             env={"CNEI_HEADERS": "admin-key=s3cret"})
        denied, served, loaded = denied.result(), served.result(), loaded.result()
    assert denied.returncode == 2
    assert "error (PERMISSION_DENIED): the inference API is restricted: send header 'infer-key'" in denied.stderr
    assert served.returncode == 0 and "top-1:" in served.stdout
    assert loaded.returncode == 0 and "model digits loaded" in loaded.stdout
