"""The coordinator's REST API as Triton's HTTP client uses it: binary tensor data (tritonclient's
default), model configuration, statistics, repository index and system shared memory."""
from __future__ import annotations

import gzip
import json
import socket
import time
import urllib.request
import uuid

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as http
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec
from services.models.digits import load_split
from tests.e2e.processes import push_digits_as, put_deployment

ROWS = 8


@pytest.fixture(scope="module")
def client(mesh):
    c = http.InferenceServerClient(mesh.rest.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def images():
    return load_split()[1][:ROWS].astype(np.float32)


def _infer(client, x, binary_in: bool, outputs=None):
    inp = http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    return client.infer("digits", [inp], outputs=outputs, parameters={"precision": "FP32"})


def test_binary_and_json_tensors_give_the_same_answer(client, images):
    expected = _infer(client, images, binary_in=False,
                      outputs=[http.InferRequestedOutput("probabilities", binary_data=False)]).as_numpy("probabilities")
    assert expected.shape == (ROWS, 10)
    for binary_in in (True, False):
        for binary_out in (True, False, None):  # None: no outputs named, all sent binary
            outputs = None if binary_out is None else [http.InferRequestedOutput("probabilities", binary_data=binary_out)]
            result = _infer(client, images, binary_in, outputs)
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
            sent_binary = binary_out is not False
            assert ("binary_data_size" in result.get_output("probabilities").get("parameters", {})) == sent_binary


@pytest.mark.parametrize("priority", [-1, 1.7], ids=["negative", "fraction"])
def test_a_priority_that_is_no_uint64_is_a_400_naming_it(client, images, priority):
    inp = http.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(images[:1], binary_data=False)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("digits", [inp], priority=priority)
    assert refused.value.status() == "400"
    assert f"parameter 'priority' must be an integer from 0 to {2 ** 64 - 1}, got {priority}" in refused.value.message()


def test_replies_carry_the_request_id_only_when_the_request_has_one(client, images):
    assert "id" not in _infer(client, images, binary_in=True).get_response()  # as Triton writes them
    inp = http.InferInput("input", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    assert client.infer("digits", [inp], request_id="req-7").get_response()["id"] == "req-7"


def test_model_configuration_statistics_and_repository_index(client, images):
    config = client.get_model_config("digits")
    assert config["max_batch_size"] > 0
    first = config["input"][0]
    assert (first["name"], first["data_type"], first["dims"]) == ("input", "TYPE_FP32", [64])
    before = client.get_inference_statistics("digits")["model_stats"][0]["inference_count"]
    _infer(client, images, binary_in=True)
    after = client.get_inference_statistics("digits")["model_stats"][0]
    assert isinstance(after["inference_count"], int) and after["inference_count"] >= before + ROWS
    assert any(m["name"] == "digits" for m in client.get_inference_statistics()["model_stats"])
    assert {"name": "digits", "version": "1", "state": "READY"} in client.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_model_config("nope")


def test_tensors_in_system_shared_memory(client, images):
    tag = uuid.uuid4().hex[:10]
    names, keys = (f"in-{tag}", f"out-{tag}"), (f"/cnei-rest-{tag}-in", f"/cnei-rest-{tag}-out")
    sizes = (images.nbytes, ROWS * 10 * 4)
    handles = [shm.create_shared_memory_region(n, k, s) for n, k, s in zip(names, keys, sizes)]
    try:
        shm.set_shared_memory_region(handles[0], [images])
        for name, key, size in zip(names, keys, sizes):
            client.register_system_shared_memory(name, key, size)
        assert {r["name"] for r in client.get_system_shared_memory_status()} >= set(names)
        expected = _infer(client, images, binary_in=True).as_numpy("probabilities")
        inp = http.InferInput("input", list(images.shape), "FP32")
        inp.set_shared_memory(names[0], sizes[0])
        out = http.InferRequestedOutput("probabilities", binary_data=True)
        out.set_shared_memory(names[1], sizes[1])
        result = client.infer("digits", [inp], outputs=[out], parameters={"precision": "FP32"})
        got = shm.get_contents_as_numpy(handles[1], np.float32, result.get_output("probabilities")["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        client.unregister_system_shared_memory(names[0])
        with pytest.raises(InferenceServerException, match=f"no shared memory region named '{names[0]}'"):
            client.infer("digits", [inp], outputs=[out])
        assert client.get_cuda_shared_memory_status() == []
        with pytest.raises(InferenceServerException, match="use system shared memory"):
            client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 64)
    finally:
        client.unregister_system_shared_memory()
        for h in handles:
            shm.destroy_shared_memory_region(h)
    assert client.get_system_shared_memory_status() == []


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_replies(client, images, algorithm):
    expected = _infer(client, images, binary_in=True).as_numpy("probabilities")
    inp = http.InferInput("input", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    result = client.infer("digits", [inp], parameters={"precision": "FP32"},
                          request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)


def test_replies_are_compressed_when_the_client_accepts_it(mesh, images):
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(images.shape),
                                   "data": images.ravel().tolist()}]}).encode()
    request = urllib.request.Request(f"{mesh.rest}/v2/models/digits/infer", data=body, method="POST",
                                     headers={"Accept-Encoding": "gzip", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["Content-Encoding"] == "gzip"
        answer = json.loads(gzip.decompress(reply.read()))
    assert np.asarray(answer["outputs"][0]["data"]).reshape(ROWS, 10).argmax(1).tolist() == \
        _infer(http.InferenceServerClient(mesh.rest.removeprefix("http://")), images, True).as_numpy(
            "probabilities").argmax(1).tolist()


def test_a_request_whose_client_hangs_up_while_it_is_queued_is_never_run(mesh, digits_models, images):
    """As over gRPC, a REST client that closes its connection takes its queued request out: the
    model never runs it (here it would have waited 1 s in the coordinator's batcher)."""
    model = push_digits_as(mesh, digits_models, f"rest-hangup-{uuid.uuid4().hex[:6]}")
    put_deployment(mesh, DeploymentSpec(model=model, attempt_timeout_ms=10_000,
                                        batching=BatchingSpec(max_batch_size=64, max_queue_delay_us=1_000_000)))
    host, port = mesh.rest.removeprefix("http://").split(":")
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "data": images[0].tolist()}]}).encode()
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    grpc_client = triton.InferenceServerClient(mesh.coordinator)
    try:
        # the deployment's batching is in force once a request waits out its queue delay
        infra.wait_until(lambda: _answered_after(host, int(port), head + body) >= 0.9, 30,
                         "the 1 s queue delay in force")
        ran = grpc_client.get_inference_statistics(model).model_stats[0].inference_count
        with socket.create_connection((host, int(port))) as hung_up:
            hung_up.sendall(head + body)
            time.sleep(0.3)
            hung_up.shutdown(socket.SHUT_RDWR)
        time.sleep(1.5)  # past its queue delay: it would have run by now
        stats = grpc_client.get_inference_statistics(model).model_stats[0]
        assert stats.inference_count == ran, "the request of the client that hung up was run"
    finally:
        grpc_client.close()


def _answered_after(host: str, port: int, request: bytes) -> float:
    """Seconds until a raw HTTP request is answered 200 (0 when it is refused: not ready yet)."""
    began = time.monotonic()
    with socket.create_connection((host, port)) as conn:
        conn.sendall(request)
        ok = conn.recv(12).startswith(b"HTTP/1.1 200")
    return time.monotonic() - began if ok else 0.0
