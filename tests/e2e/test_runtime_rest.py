"""Edge runtimes serve OIP REST v2 (KServe v2 HTTP/JSON, Triton's HTTP API) on their own port, as
the coordinator does: tritonclient.http talks to a runtime directly; the REST port shares the
gRPC port's settings (shared-memory regions), restricted APIs and TLS, and closes when the runtime
stops."""
from __future__ import annotations

import http.client
import signal
import ssl
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.utils as triton_utils
import tritonclient.utils.shared_memory as shm

from services.cli import infra
from services.cli.up import RUNTIMES
from services.common import tls
from services.models.digits import load_all
from tests.e2e.processes import start_runtime

NODES = [node_id for node_id, _, _ in RUNTIMES]
KEY = ("infer-key", "s3cret")


def _rows(count: int = 4) -> np.ndarray:
    return load_all()[0][:count].astype(np.float32)


def _http_infer(client: triton_http.InferenceServerClient, x: np.ndarray, binary: bool, version: str = "",
                headers: dict[str, str] | None = None) -> np.ndarray:
    tensor = triton_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [triton_http.InferRequestedOutput("probabilities", binary_data=binary)]
    return client.infer("digits", [tensor], model_version=version, outputs=wanted, headers=headers).as_numpy(
        "probabilities")


def _grpc_infer(address: str, x: np.ndarray) -> np.ndarray:
    client = triton_grpc.InferenceServerClient(address)
    try:
        tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer("digits", [tensor], client_timeout=30).as_numpy("probabilities")
    finally:
        client.close()


@pytest.fixture
def rest(mesh, request):
    client = triton_http.InferenceServerClient(mesh.runtime_rest(request.param))
    yield client
    client.close()


@pytest.mark.parametrize("rest", NODES, indirect=True)
def test_a_runtime_answers_triton_http_health_and_metadata(rest):
    assert rest.is_server_live() and rest.is_server_ready()
    server = rest.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"] and "model_repository" in server["extensions"]
    model = rest.get_model_metadata("digits")
    assert model["name"] == "digits" and [t["name"] for t in model["inputs"]] == ["input"]
    assert rest.is_model_ready("digits") and rest.is_model_ready("digits", "1")
    assert rest.get_model_config("digits")["name"] == "digits"
    assert any(m["name"] == "digits" for m in rest.get_model_repository_index())
    assert "trace_level" in rest.get_trace_settings() and "log_info" in rest.get_log_settings()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("version", ["", "1"], ids=["latest", "version-1"])
@pytest.mark.parametrize("rest", NODES, indirect=True)
def test_a_runtime_infers_over_rest_as_over_grpc(mesh, rest, binary, version, request):
    x = _rows()
    node = request.node.callspec.params["rest"]
    before = sum(s["inference_count"] for s in rest.get_inference_statistics("digits")["model_stats"])
    got = _http_infer(rest, x, binary, version)
    np.testing.assert_allclose(got, _grpc_infer(mesh.runtime(node), x), rtol=1e-5, atol=1e-6)
    after = sum(s["inference_count"] for s in rest.get_inference_statistics("digits")["model_stats"])
    assert after - before >= len(x)


@pytest.mark.parametrize("rest", NODES[:1], indirect=True)
def test_a_runtime_answers_an_unknown_model_404_in_tritons_words(rest):
    with pytest.raises(triton_utils.InferenceServerException, match="no-such-model") as refused:
        rest.get_model_metadata("no-such-model")
    assert refused.value.status() == "404"


@pytest.mark.parametrize("rest", NODES[:1], indirect=True)
def test_a_shared_memory_region_registered_over_rest_is_the_grpc_ports_too(mesh, rest):
    name, key = f"rest-region-{time.monotonic_ns()}", f"/cnei-rest-{time.monotonic_ns()}"
    handle = shm.create_shared_memory_region(name, key, 256)
    grpc = triton_grpc.InferenceServerClient(mesh.runtime(NODES[0]))
    try:
        rest.register_system_shared_memory(name, key, 256)
        listed = grpc.get_system_shared_memory_status(name)
        assert [r.key for r in listed.regions.values()] == [key]
        grpc.unregister_system_shared_memory(name)
        assert name not in [r["name"] for r in rest.get_system_shared_memory_status()]
    finally:
        grpc.close()
        shm.destroy_shared_memory_region(handle)


@pytest.fixture(scope="module")
def restricted_node(mesh, tmp_path_factory):
    """A runtime of its own with its inference API restricted and REST on: (process, REST address)."""
    http_port = infra.free_port()
    proc, _ = start_runtime(mesh, "edge-rest1", "site-rest", tmp_path_factory.mktemp("rest-node"),
                            CNEI_RUNTIME_HTTP_PORT=str(http_port),
                            CNEI_RUNTIME_RESTRICTED_APIS=f"inference:{KEY[0]}={KEY[1]}")
    infra.wait_for_port("127.0.0.1", http_port, proc=proc, timeout=30)
    try:
        yield proc, f"127.0.0.1:{http_port}"
    finally:
        infra.stop(proc)


def test_a_runtimes_rest_port_refuses_a_restricted_api_without_its_key(restricted_node):
    _, address = restricted_node
    client = triton_http.InferenceServerClient(address)
    try:
        assert client.is_server_ready()  # health is not restricted
        for headers in (None, {KEY[0]: "wrong"}):
            with pytest.raises(triton_utils.InferenceServerException, match="inference API is restricted") as no:
                _http_infer(client, _rows(1), True, headers=headers)
            assert no.value.status() == "403" and KEY[1] not in no.value.message()
        assert _http_infer(client, _rows(1), True, headers={KEY[0]: KEY[1]}).shape == (1, 10)
    finally:
        client.close()


def test_a_stopped_runtime_closes_its_rest_port_and_exits_cleanly(restricted_node):
    proc, address = restricted_node
    with urllib.request.urlopen(f"http://{address}/v2/health/live", timeout=5) as reply:
        assert reply.status == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{address}/v2/health/live", timeout=2)


def _ready_over(address: str, context: ssl.SSLContext | None) -> int:
    scheme = "https" if context is not None else "http"
    with urllib.request.urlopen(f"{scheme}://{address}/v2/health/ready", timeout=5, context=context) as reply:
        return reply.status


def test_a_runtimes_rest_port_serves_the_mutual_tls_of_its_grpc_port(mesh, pki, tmp_path_factory):
    http_port = infra.free_port()
    proc, _ = start_runtime(mesh, "edge-rest-tls", "site-rest-tls", tmp_path_factory.mktemp("rest-tls"),
                            CNEI_RUNTIME_HTTP_PORT=str(http_port), CNEI_RUNTIME_TLS_CERT_FILE=pki["cert"],
                            CNEI_RUNTIME_TLS_KEY_FILE=pki["key"], CNEI_RUNTIME_TLS_CLIENT_CA_FILE=pki["ca"])
    address = f"127.0.0.1:{http_port}"
    try:
        infra.wait_for_port("127.0.0.1", http_port, proc=proc, timeout=30)
        mutual = tls.ClientTls(pki["ca"], pki["client_cert"], pki["client_key"]).ssl_context()
        assert _ready_over(address, mutual) == 200
        for refused in (None, tls.client_ssl_context(pki["ca"]),  # plaintext; no client certificate
                        tls.client_ssl_context(pki["other_ca"], pki["client_cert"], pki["client_key"])):
            with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError, ssl.SSLError)):
                _ready_over(address, refused)
    finally:
        infra.stop(proc)
