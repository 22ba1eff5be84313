"""The coordinator's REST API refuses malformed requests as Triton does: 400 with a JSON
{"error": ...} saying what was wrong (never a 500, never a silent conversion), aiohttp's own
refusals as JSON too, restricted-API keys that are no UTF-8 refused 403, log settings that gRPC
cannot carry refused, and replies that are always strict JSON."""
from __future__ import annotations

import gzip
import json
import math
import socket
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as http

from services.cli import infra
from tests.e2e.processes import server_ready, start_coordinator

ROW = [0.0] * 64


def _post(rest: str, path: str, body: bytes, headers: dict | None = None, method: str = "POST"):
    """(status, headers, JSON body) of one request; the body must be strict JSON."""
    request = urllib.request.Request(rest + path, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            status, reply_headers, data = reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as exc:
        status, reply_headers, data = exc.code, exc.headers, exc.read()
    return status, reply_headers, json.loads(data, parse_constant=lambda t: pytest.fail(f"bare {t} in {data[:200]}"))


def _infer(rest: str, body: dict | bytes, headers: dict | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _post(rest, "/v2/models/digits/infer", raw, headers)


def _input(**fields) -> dict:
    return {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW, **fields}


@pytest.mark.parametrize(("body", "message"), [
    ({"inputs": [_input(datatype="INT8", data=[300] * 64)]}, "tensor 'input': 'data' holds a value out of range for INT8"),
    ({"inputs": [_input(datatype="INT64", data=[2**70] * 64)]}, "out of range for INT64"),
    ({"inputs": [_input(datatype="UINT8", data=[-1] * 64)]}, "out of range for UINT8"),
    ({"inputs": [_input(shape=[0, 2**62], data=[])]}, "tensor 'input': shape [0, 4611686018427387904] cannot be made"),
    ({"inputs": [_input()], "outputs": None}, "'outputs' must be a JSON array of requested outputs, not null"),
    ({"inputs": [_input()], "outputs": 5}, "'outputs' must be a JSON array of requested outputs, not 5"),
    ({"inputs": [_input(shape=[True, 64])]}, "tensor 'input': 'shape' must be a list of non-negative integers"),
    ({"inputs": [_input(datatype="BYTES", shape=[1], data=[300_000_000])]},
     "tensor 'input': 'data' of BYTES must hold JSON strings, not 300000000"),
    ({"inputs": [_input(data=["1.5"] * 64)]}, "tensor 'input': 'data' of FP32 must hold JSON numbers, not \"1.5\""),
    ({"inputs": [_input(data=[True] * 64)]}, "'data' of FP32 must hold JSON numbers, not true"),
    ({"inputs": [_input(data=[None] * 64)]}, "'data' of FP32 must hold JSON numbers, not null"),
    ({"inputs": [_input()], "outputs": [{"name": "probabilities", "parameters": {"binary_data": "false"}}]},
     "output 'probabilities': parameter 'binary_data' must be true or false, not \"false\""),
    ({"inputs": [_input()], "parameters": {"binary_data_output": "false"}},
     "parameter 'binary_data_output' must be true or false"),
    ({"inputs": [_input()], "id": 7}, "'id' must be a JSON string, not 7"),
    ({"inputs": [_input()], "id": {"a": 1}}, "'id' must be a JSON string, not {\"a\": 1}"),
    ({"inputs": [_input()], "parameters": {"foo": 2**70}}, "parameter 'foo' must be a string, boolean, number or 64-bit"),
], ids=["int8-300", "int64-2**70", "uint8-minus-1", "zero-size-huge-dim", "outputs-null", "outputs-int", "shape-bool",
        "bytes-as-int", "fp32-strings", "fp32-bools", "fp32-nulls", "binary-data-string", "binary-data-output-string",
        "id-number", "id-object", "parameter-int-too-big"])
def test_a_malformed_json_infer_request_is_a_400_saying_what_is_wrong(mesh, body, message):
    status, _, reply = _infer(mesh.rest, body)
    assert (status, set(reply)) == (400, {"error"})
    assert message in reply["error"]


@pytest.mark.parametrize(("body", "message"), [
    (b"[" * 100_000, "request body is nested too deeply"),
    (b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}]}",
     "request body is nested too deeply"),
    (b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[' + b"1" * 5000 + b"]}]}",
     "request body is not JSON: Exceeds the limit"),
    (b'{"inputs":[\xff\xfe]}', "request body is not JSON"),
], ids=["deep-array", "deep-data", "5000-digit-integer", "not-utf8"])
def test_a_body_python_cannot_parse_is_a_400(mesh, body, message):
    status, _, reply = _infer(mesh.rest, body)
    assert status == 400 and message in reply["error"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_corrupt_compressed_body_is_a_400(mesh, encoding):
    status, _, reply = _infer(mesh.rest, b"not compressed at all", {"Content-Encoding": encoding})
    assert status == 400 and reply["error"].startswith("request body cannot be read: ")


def test_a_compressed_body_that_inflates_past_the_size_limit_is_a_json_413(mesh):
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip: 65 MiB of spaces in about 64 KiB
    body = b"".join(deflate.compress(b" " * (1 << 20)) for _ in range(65)) + deflate.flush()
    status, _, reply = _infer(mesh.rest, body, {"Content-Encoding": "gzip"})
    assert status == 413 and reply["error"].startswith("Request Entity Too Large: Maximum request body size")


def test_unknown_paths_and_wrong_methods_are_answered_in_tritons_json(mesh):
    status, _, reply = _post(mesh.rest, "/v2/bogus", None, method="GET")
    assert (status, reply) == (404, {"error": "Not Found: GET /v2/bogus"})
    status, headers, reply = _post(mesh.rest, "/v2/models/digits/infer", None, method="GET")
    assert (status, reply) == (405, {"error": "Method Not Allowed: GET /v2/models/digits/infer"})
    assert headers["Allow"] == "POST"


def test_well_formed_requests_still_answer(mesh):
    status, _, reply = _infer(mesh.rest, {"id": "r1", "inputs": [_input(data=[[1] * 32, [0.5] * 32])],
                                          "parameters": {"binary_data_output": False, "priority": 1},
                                          "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]})
    assert status == 200 and reply["id"] == "r1"
    assert len(reply["outputs"][0]["data"]) == 10 and math.isclose(sum(reply["outputs"][0]["data"]), 1, rel_tol=1e-4)


def test_nan_outputs_are_written_as_strict_json_and_read_back_as_nan(mesh):
    # bare NaN in a request is taken (Triton parses it too); the digits model answers NaN for it
    body = json.dumps({"inputs": [_input(data=[float("nan")] * 64)]}).encode()
    status, _, reply = _infer(mesh.rest, body)  # _post fails on a bare NaN token
    assert status == 200 and reply["outputs"][0]["data"] == ["NaN"] * 10
    client = http.InferenceServerClient(mesh.rest.removeprefix("http://"))
    try:
        tensor = http.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.full((1, 64), np.nan, np.float32), binary_data=False)
        result = client.infer("digits", [tensor], outputs=[http.InferRequestedOutput("probabilities", binary_data=False)])
        assert np.isnan(result.as_numpy("probabilities")).all()
    finally:
        client.close()


def test_a_verbose_level_grpc_cannot_carry_is_refused_and_grpc_still_reads_the_settings(mesh):
    status, _, reply = _post(mesh.rest, "/v2/logging", json.dumps({"log_verbose_level": 2**32}).encode())
    assert status == 400 and "'log_verbose_level' is an unsigned integer up to 4294967295" in reply["error"]
    client = grpcclient.InferenceServerClient(mesh.coordinator)
    try:
        assert client.get_log_settings(as_json=True)["settings"]["log_verbose_level"]["uint32_param"] < 2**32
    finally:
        client.close()


def _raw_infer(port: int, key: bytes) -> tuple[int, dict]:
    body = b'{"inputs":[]}'
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nInfer-Key: " + key +
                     b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_a_restricted_key_header_that_is_no_utf8_is_refused_403(mesh):
    proc, address, http_port, _ = start_coordinator(mesh, export_spans=False,
                                                    CNEI_COORDINATOR_RESTRICTED_APIS="inference:Infer-Key=abc")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        infra.wait_for_port("127.0.0.1", http_port, proc=proc, timeout=30)
        for key in (b"\xff", b"ab\xc3", b"wrong"):
            status, reply = _raw_infer(http_port, key)
            assert (status, reply) == (403, {"error": "the inference API is restricted: send header 'infer-key' "
                                                      "with its value"})
        status, reply = _raw_infer(http_port, b"abc")  # the key: past the guard, to the (empty) request
        assert status == 400 and "restricted" not in reply["error"]
    finally:
        infra.stop(proc)


def test_gzip_bodies_still_inflate(mesh):
    body = gzip.compress(json.dumps({"inputs": [_input()]}).encode())
    status, _, reply = _infer(mesh.rest, body, {"Content-Encoding": "gzip"})
    assert status == 200 and reply["outputs"][0]["shape"] == [1, 10]
