"""run_service: a service's process exits after its composition root returns, even when a
library leaves a task behind that ignores cancellation."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from services.common import lifecycle


def test_a_task_that_ignores_cancellation_cannot_keep_the_service_alive(caplog):
    finished = []

    async def stubborn() -> None:  # like a reconnect loop that swallows CancelledError
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    async def polite() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            finished.append("polite")
            raise

    async def main() -> None:
        asyncio.ensure_future(stubborn())
        asyncio.ensure_future(polite())
        await asyncio.sleep(0)
        finished.append("main")

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="services.common.lifecycle"):
        lifecycle.run_service(main(), leftover_s=0.3)
    assert time.monotonic() - started < 3.0
    assert finished == ["main", "polite"]
    assert any("stubborn" in r.getMessage() and "still running" in r.getMessage() for r in caplog.records)


def test_the_composition_root_s_result_and_errors_are_not_swallowed():
    async def fails() -> None:
        raise RuntimeError("bad settings")

    with pytest.raises(RuntimeError, match="bad settings"):
        lifecycle.run_service(fails(), leftover_s=0.3)


HUNG_SHUTDOWN = """
import asyncio, logging, sys
from services.common import lifecycle

async def main():
    stop = lifecycle.stop_event(limit_s=1.0)
    print("ready", flush=True)
    await stop.wait()
    await asyncio.Event().wait()  # a shutdown step that never ends

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
lifecycle.run_service(main())
"""


def test_a_shutdown_that_hangs_ends_the_process_after_the_limit_naming_what_it_waited_for():
    proc = subprocess.Popen([sys.executable, "-c", HUNG_SHUTDOWN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = proc.wait(15)
        assert code == 1 and 0.8 < time.monotonic() - started < 10
        assert "still shutting down 1 s after the stop signal; exiting. Waiting: main at" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_cancel_and_wait_ends_a_loop_whose_cancel_was_lost():
    """A lost cancel (Python 3.11's asyncio.wait_for drops one landing as its future completes)
    looks to the loop like no cancel at all: it goes round again. Cancelling once and waiting
    would wait for ever; cancel_and_wait cancels again until the loop has ended."""
    import asyncio
    import time

    from services.common.lifecycle import cancel_and_wait

    rounds = []

    async def loop_losing_two_cancels():
        lost = 0
        while True:
            rounds.append(1)
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if lost == 2:
                    raise
                lost += 1  # as if an inner wait_for had swallowed it

    task = asyncio.create_task(loop_losing_two_cancels())
    await asyncio.sleep(0.01)
    start = time.monotonic()
    await cancel_and_wait(task, None, again_s=0.05)
    assert task.cancelled() and time.monotonic() - start < 2.0 and len(rounds) >= 3


def test_the_event_loop_is_uvloop_by_default_and_asyncio_s_on_request():
    import uvloop

    seen = {}

    async def which(name: str) -> None:
        seen[name] = type(asyncio.get_running_loop())

    lifecycle.run_service(which("auto"), leftover_s=0.3)
    lifecycle.run_service(which("uvloop"), leftover_s=0.3, event_loop="uvloop")
    lifecycle.run_service(which("asyncio"), leftover_s=0.3, event_loop="asyncio")
    assert seen["auto"] is uvloop.Loop and seen["uvloop"] is uvloop.Loop
    assert not issubclass(seen["asyncio"], uvloop.Loop)
    assert isinstance(asyncio.new_event_loop(), type(lifecycle.new_event_loop("asyncio")))


def test_an_unknown_event_loop_ends_the_service_with_a_clear_message():
    async def never() -> None:
        raise AssertionError("must not run")

    with pytest.raises(SystemExit, match="event loop 'trio': expected one of auto, uvloop, asyncio"):
        lifecycle.run_service(never(), leftover_s=0.3, event_loop="trio")


def test_a_service_started_with_an_unknown_event_loop_exits_with_that_message():
    env = {**os.environ, "CNEI_REGISTRY_EVENT_LOOP": "trio"}
    done = subprocess.run([sys.executable, "-m", "services.registry"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode != 0
    assert "event loop 'trio': expected one of auto, uvloop, asyncio" in done.stderr


async def test_a_draining_server_says_not_serving_and_still_answers():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(lambda servicer, s: None, None, "cnei.Example")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", "cnei.Example"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await server.draining()
            for name in ("", "cnei.Example"):  # answered: the server is still up, just not taking work
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(0)


async def _wait(request: bytes, context) -> bytes:
    await asyncio.sleep(float(request))
    return b"done"


async def _wait_then_stream(request: bytes, context):
    await asyncio.sleep(float(request))
    yield b"done"


# method -> (the channel's call of its kind, its behaviour, its handler)
HANDLERS = {"Wait": (lambda channel: channel.unary_unary, grpc.unary_unary_rpc_method_handler(_wait)),
            "WaitStream": (lambda channel: channel.unary_stream,
                           grpc.unary_stream_rpc_method_handler(_wait_then_stream))}


async def _call(channel, method: str, seconds: float) -> str:
    kind = HANDLERS[method][0]
    try:
        call = kind(channel)(f"/cnei.Example/{method}")(str(seconds).encode(), timeout=10)
        if method == "WaitStream":
            return "OK" if [reply async for reply in call] == [b"done"] else "wrong"
        return "OK" if await call == b"done" else "wrong"
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


@pytest.mark.parametrize("method", sorted(HANDLERS))
async def test_a_stopping_server_finishes_the_calls_in_flight_and_refuses_new_ones_unavailable(method):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = lifecycle.GrpcServer("127.0.0.1", 0)
    handlers = {name: handler for name, (_, handler) in HANDLERS.items()}
    generic = grpc.method_handlers_generic_handler("cnei.Example", handlers)
    server.add(lambda _, s: s.add_generic_rpc_handlers([generic]), None, "cnei.Example")
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        held = [asyncio.ensure_future(_call(channel, method, 0.5)) for _ in range(20)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        stopping = asyncio.ensure_future(server.stop(grace=5.0))
        await asyncio.sleep(0.05)
        assert await _call(channel, method, 0) == "UNAVAILABLE: server is shutting down"
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.gather(*held) == ["OK"] * 20
        await stopping
    assert time.monotonic() - started < 2.0  # done when the calls were, not at the end of the grace
