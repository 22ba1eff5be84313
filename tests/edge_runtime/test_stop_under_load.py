"""An edge runtime process stopped (SIGTERM) while clients send it waves of concurrent requests
stops gracefully: the requests it holds are answered, the ones that come after are refused
UNAVAILABLE (which clients retry elsewhere), none is CANCELLED, and it exits cleanly. A registry
process of the module's own and a runtime process per test, on free ports."""
from __future__ import annotations

import asyncio
import collections
import signal
import time

import grpc
import numpy as np
import pytest

from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.edge_runtime.processes import start_runtime

RETRIED = {"OK", "UNAVAILABLE"}  # what a client may see of a stopping server: CANCELLED is never retried


def _request(model: str, rows: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    request.raw_input_contents.append(np.random.rand(rows, 64).astype(np.float32).tobytes())
    return request


async def _one(stub, model: str, rows: int) -> str:
    try:
        await stub.ModelInfer(_request(model, rows), timeout=30)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def _waves(address: str, model: str, proc, waves: int, concurrent: int, rows: int,
                 term_at: int) -> collections.Counter:
    """`waves` waves of `concurrent` requests, one after another (as the reviewer's burst.py
    sends them); SIGTERM just after wave `term_at` set out."""
    outcomes: collections.Counter = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for number in range(waves):
            wave = [asyncio.ensure_future(_one(stub, model, rows)) for _ in range(concurrent)]
            if number == term_at:
                await asyncio.sleep(0.02)  # the wave is on its way
                proc.send_signal(signal.SIGTERM)
            outcomes.update(await asyncio.gather(*wave))
    return outcomes


@pytest.mark.parametrize("term_at", [1, 4, 8])
def test_a_runtime_stopped_under_waves_of_requests_answers_or_refuses_them_all_and_cancels_none(
        registry, nats_server, redis_server, push_digits, tmp_path, term_at):
    variant = asyncio.run(push_digits("stop"))
    proc, address = start_runtime(registry, nats_server, redis_server, tmp_path / "node",
                                  CNEI_RUNTIME_PRELOAD=variant.name)
    try:
        outcomes = asyncio.run(_waves(address, variant.name, proc, 20, 200, 64, term_at))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert outcomes["OK"] >= 200 * term_at
    assert set(outcomes) <= RETRIED, dict(outcomes)


def test_requests_held_when_the_runtime_is_told_to_stop_are_answered_before_it_exits(
        registry, nats_server, redis_server, push_digits, tmp_path):
    variant = asyncio.run(push_digits("held"))
    proc, address = start_runtime(registry, nats_server, redis_server, tmp_path / "node",
                                  CNEI_RUNTIME_PRELOAD=variant.name, CNEI_RUNTIME_EMULATED_DELAY_MS="800")

    async def go() -> list[str]:
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.channel_ready()
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            held = [asyncio.ensure_future(_one(stub, variant.name, 1)) for _ in range(50)]
            await asyncio.sleep(0.3)  # every one is in the runtime, waiting out its delay
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*held)
    try:
        assert asyncio.run(go()) == ["OK"] * 50
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
