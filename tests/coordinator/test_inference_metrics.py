"""cnei_inference_requests_total / cnei_inference_request_duration_seconds through a real
coordinator (tests/coordinator/mesh.py), over gRPC and over REST on a real aiohttp server
(handler_cancellation on, as the coordinator runs it): requests failed by their clients are
counted under the outcome their reply says, and a request its client gave up on is `cancelled`."""
from __future__ import annotations

import asyncio
import zlib

import grpc
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from services.common import oip
from services.coordinator.rest import build_app
from tests.coordinator.mesh import NodeCore, mesh, variant

INFER = "/v2/models/m/infer"
GOOD = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}


def counts(model: str) -> dict[str, float]:
    """cnei_inference_requests_total of `model`, by outcome."""
    return {s.labels["outcome"]: s.value for m in REGISTRY.collect() if m.name == "cnei_inference_requests"
            for s in m.samples if s.name.endswith("_total") and s.labels["model"] == model}


def timed(model: str) -> dict[str, float]:
    """How many of `model`'s requests cnei_inference_request_duration_seconds holds, by outcome."""
    return {s.labels["outcome"]: s.value for m in REGISTRY.collect()
            if m.name == "cnei_inference_request_duration_seconds"
            for s in m.samples if s.name.endswith("_count") and s.labels["model"] == model}


def added(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after) if after.get(k, 0) != before.get(k, 0)}


@pytest.fixture
async def rest():
    """A coordinator over one stand-in node, its REST on a real server; model 'm' served once."""
    async with mesh([variant()], {}, {"n1": NodeCore()}) as m:
        async with TestClient(TestServer(build_app(m.core), handler_cancellation=True)) as client:
            assert (await client.post(INFER, json=GOOD)).status == 200
            yield m, client


async def hang_up_halfway(client: TestClient) -> None:
    """Send half a body of the length announced, then close the connection."""
    _, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n{\"inputs\":")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()


async def test_a_client_hanging_up_halfway_through_its_upload_is_counted_cancelled_not_ok(rest):
    _, client = rest
    before, durations = counts("m"), timed("m")
    for _ in range(3):
        await hang_up_halfway(client)
    await asyncio.sleep(0.3)
    assert added(before, counts("m")) == {"cancelled": 3}
    assert added(durations, timed("m")) == {"cancelled": 3}  # none in the successes' histogram


def gzip_bomb() -> bytes:
    """65 MiB of spaces in about 64 KiB of gzip."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(deflate.compress(b" " * (1 << 20)) for _ in range(65)) + deflate.flush()


@pytest.mark.parametrize(("body", "headers", "status", "outcome"), [
    (b" " * (65 << 20), {}, 413, "resource_exhausted"),
    (gzip_bomb(), {"Content-Encoding": "gzip"}, 413, "resource_exhausted"),
    (b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400, "invalid_argument"),
    (b"not compressed at all", {"Content-Encoding": "deflate"}, 400, "invalid_argument"),
    (b"{}", {"Content-Encoding": "br"}, 400, "invalid_argument"),
    (b"{not json", {}, 400, "invalid_argument"),
], ids=["65-mib", "gzip-inflating-past-the-limit", "corrupt-gzip", "corrupt-deflate", "not-brotli", "not-json"])
async def test_a_body_the_server_refuses_counts_as_the_clients_error_its_reply_says(rest, body, headers, status,
                                                                                     outcome):
    _, client = rest
    before = counts("m")
    reply = await client.post(INFER, data=body, headers=headers)
    assert reply.status == status
    assert added(before, counts("m")) == {outcome: 1}


async def test_a_grpc_client_cancelling_its_call_is_counted_cancelled_not_ok():
    async with mesh([variant()], {}, {"n1": NodeCore(delay_s=0.3)}) as m:
        assert (await m.infer())[0] == "OK"
        before = counts("m")
        call = m.call()
        await asyncio.sleep(0.1)  # at the node
        call.cancel()
        await asyncio.sleep(0.3)
        # the coordinator's request and its call to the node, which it cancelled (one process here)
        assert added(before, counts("m")) == {"cancelled": 2}


# --- model labels: only models the process knows ----------------------------------------------

async def send(m, message) -> str:
    """The status name of one ModelInfer of `message` to the coordinator."""
    try:
        await m.stub.ModelInfer(message, timeout=10)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


def labelled(prefix: str) -> list[str]:
    """Model labels of the inference metrics that start with `prefix`."""
    return sorted({s.labels["model"] for m in REGISTRY.collect()
                   if m.name in ("cnei_inference_requests", "cnei_inference_request_duration_seconds")
                   for s in m.samples if s.labels.get("model", "").startswith(prefix)})


@pytest.mark.parametrize(("body", "headers"), [
    (b"garbage", {}),
    (b"zz", {"Content-Encoding": "gzip"}),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}),
    (b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": ["a", "b"]}]}', {}),
], ids=["not-json", "corrupt-gzip", "header-length-past-the-body", "bad-tensor"])
async def test_a_malformed_rest_request_for_a_made_up_model_is_counted_under_unknown_not_its_name(
        rest, body, headers):
    _, client = rest
    before = counts("_unknown")
    for i in range(3):
        assert (await client.post(f"/v2/models/made-up-rest-{i}/infer", data=body, headers=headers)).status == 400
    assert labelled("made-up-rest-") == []
    assert added(before, counts("_unknown")) == {"invalid_argument": 3}


async def test_a_malformed_request_for_a_known_model_still_counts_under_its_name(rest):
    m, client = rest
    before = counts("m")
    assert (await client.post(INFER, data=b"garbage")).status == 400
    message = oip.request_to_proto(oip.InferRequest("m", {"x": np.ones((1, 2), np.float32)}))
    message.raw_input_contents.append(b"\0" * 4)  # two raw contents for one input
    assert await send(m, message) == "INVALID_ARGUMENT"
    assert added(before, counts("m")) == {"invalid_argument": 2}


async def test_a_malformed_grpc_request_for_a_made_up_model_is_counted_under_unknown_not_its_name(rest):
    m, _ = rest
    before = counts("_unknown")
    for i in range(3):
        message = oip.request_to_proto(oip.InferRequest(f"made-up-grpc-{i}", {"x": np.ones((1, 2), np.float32)}))
        message.raw_input_contents.append(b"\0" * 4)  # two raw contents for one input
        assert await send(m, message) == "INVALID_ARGUMENT"
    assert labelled("made-up-grpc-") == []
    assert added(before, counts("_unknown")) == {"invalid_argument": 3}
