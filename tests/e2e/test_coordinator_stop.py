"""A coordinator stopped (SIGTERM) while clients send it waves of concurrent requests stops as
an edge runtime does (services/common/drain.py): the requests it holds are answered, those that
come after are refused UNAVAILABLE, none is CANCELLED; with its compiled front door too. An extra
coordinator of the session's mesh."""
from __future__ import annotations

import asyncio
import collections
import signal

import grpc
import numpy as np
import pytest

from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.processes import start_coordinator, start_door

RETRIED = {"OK", "UNAVAILABLE"}  # what a client may see of a stopping server: CANCELLED is never retried


async def _one(stub, rows: int) -> str:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    request.raw_input_contents.append(np.random.rand(rows, 64).astype(np.float32).tobytes())
    try:
        await stub.ModelInfer(request, timeout=30)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


async def _waves(address: str, proc, waves: int, concurrent: int, rows: int, term_at: int) -> collections.Counter:
    """`waves` waves of `concurrent` digits requests of `rows` rows, one after another; SIGTERM
    just after wave `term_at` set out: the outcomes, each with its message."""
    outcomes: collections.Counter = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for number in range(waves):
            wave = [asyncio.ensure_future(_one(stub, rows)) for _ in range(concurrent)]
            if number == term_at:
                await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
            outcomes.update(await asyncio.gather(*wave))
    return outcomes


@pytest.mark.parametrize("door", [False, True], ids=["full-path", "front-door"])
def test_a_coordinator_stopped_under_waves_of_requests_answers_or_refuses_them_all_and_cancels_none(mesh, door):
    proc, address = (start_door(mesh)[:2] if door else
                     start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="off")[:2])
    try:
        outcomes = asyncio.run(_waves(address, proc, 12, 200, 16, 3))
        assert proc.wait(40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert outcomes["OK"] >= 600
    assert {o.split(":")[0] for o in outcomes} <= RETRIED, dict(outcomes)
