"""Composition-root helpers: signal handling and a gRPC server with standard health checking and
server reflection."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Coroutine

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import grpc_util
from services.common.drain import Drain
from services.common.reflection import enable as enable_reflection
from services.common.settings import EVENT_LOOPS

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
LEFTOVER_S = 5.0
SHUTDOWN_LIMIT_S = 30.0  # from the stop signal to exit, whatever a shutdown step is waiting for


def new_event_loop(choice: str = "auto") -> asyncio.AbstractEventLoop:
    """The event loop a service runs on: uvloop (libuv; less CPU per socket event: ~0.1 ms off a
    request through the coordinator at concurrency 1 here) or asyncio's own. `auto` takes uvloop
    when it is installed; `uvloop` insists on it."""
    if choice not in EVENT_LOOPS:
        raise ValueError(f"event loop {choice!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError("event loop 'uvloop' asked for but uvloop is not installed") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_service(main: Coroutine, leftover_s: float = LEFTOVER_S, event_loop: str = "auto") -> None:
    """`asyncio.run` for a service's composition root (on `new_event_loop(event_loop)`; an unknown
    choice ends the process with its message), with one difference: tasks still running when
    `main` returns (a client library's reconnect loop, say) are cancelled and given
    `leftover_s` to end, then left behind with a warning, so the process always exits. (Seen:
    nats-py kept a trainer alive for good when the NATS server died as the trainer shut down.)"""
    try:
        loop = new_event_loop(event_loop)
    except ValueError as exc:
        main.close()
        raise SystemExit(str(exc)) from None
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    finally:
        try:
            leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in leftover:
                task.cancel()
            if leftover:
                _, stuck = loop.run_until_complete(asyncio.wait(leftover, timeout=leftover_s))
                for task in stuck:
                    log.warning("task %r still running %.0f s after shutdown; exiting without it",
                                task.get_coro(), leftover_s)
            loop.run_until_complete(loop.shutdown_asyncgens())
            try:  # work handed to threads (ONNX Runtime calls) ends on its own; wait for it, boundedly
                loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), leftover_s))
            except asyncio.TimeoutError:
                log.warning("executor threads still busy %.0f s after shutdown; exiting without them", leftover_s)
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` (blocking: run it off an event loop)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_with_parent(parent_pid: int) -> None:
    """Linux: SIGTERM this process when its parent (a supervisor) dies, so a supervisor killed
    with -9 leaves no workers behind; also when that parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


CANCEL_AGAIN_S = 0.2


async def cancel_and_wait(*tasks: asyncio.Task | None, again_s: float = CANCEL_AGAIN_S) -> None:
    """Cancel background loops and wait for them to end, cancelling again every `again_s` while
    one runs on: on Python 3.11 a cancel that lands as an inner `asyncio.wait_for`'s future
    completes (redis-py and nats-py use it) is dropped, and the loop would go round again,
    holding up the shutdown. For loops only: a task with cleanup to finish after its cancel
    (the trainer's jobs) must not be cancelled again while it cleans up."""
    running = {t for t in tasks if t is not None}
    while pending := {t for t in running if not t.done()}:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=again_s)
    await asyncio.gather(*running, return_exceptions=True)


def stop_event(limit_s: float = SHUTDOWN_LIMIT_S) -> asyncio.Event:
    """An event set on SIGTERM or SIGINT. A service still shutting down `limit_s` after the first
    signal exits anyway (status 1), naming what it was waiting for: a hung shutdown step must not
    leave a process behind (seen: a coordinator worker whose supervisor had been killed, waiting
    for good)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not event.is_set():
            event.set()
            loop.call_later(limit_s, _give_up, limit_s)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return event


def _give_up(limit_s: float) -> None:
    waiting = []
    for task in asyncio.all_tasks():
        frames = task.get_stack()
        where = f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "?"
        waiting.append(f"{task.get_coro().__qualname__} at {where}")
    log.error("still shutting down %.0f s after the stop signal; exiting. Waiting: %s", limit_s,
              "; ".join(sorted(waiting)) or "nothing")
    logging.shutdown()
    os._exit(1)


class GrpcServer:
    """A grpc.aio server bound to host:port with the standard health service and, unless turned
    off, server reflection (grpcurl's `list`, `describe` and calls without .proto files)."""

    def __init__(self, host: str, port: int, max_message_bytes: int = grpc_util.MAX_MESSAGE_BYTES,
                 interceptors: list | None = None, reuse_port: bool = False,
                 credentials: grpc.ServerCredentials | None = None, reflection: bool = True):
        """`credentials`: TLS (services.common.tls); None: plaintext. `reflection`: serve gRPC
        server reflection for health and the services added, to every client (restricted APIs
        leave it open: it describes the protos, no data)."""
        self.drain = Drain()  # first: a stopping server refuses calls before any other interceptor sees them
        self.server = grpc.aio.server(options=grpc_util.server_options(max_message_bytes, reuse_port),
                                      interceptors=[self.drain, *(interceptors or [])])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{host}:{port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")
        self.address = f"{host}:{self.port}"
        self._names: list[str] = [""]
        self._listed: list[str] = [health.SERVICE_NAME]
        self.reflection = reflection

    def add(self, add_fn, servicer, service_name: str, listed: bool = True) -> None:
        """`listed`: reflection names and describes the service (False: a private one, such as
        the front door's control service, which the door's public port refuses)."""
        add_fn(servicer, self.server)
        self._names.append(service_name)
        if listed:
            self._listed.append(service_name)

    async def start(self) -> None:
        if self.reflection:
            enable_reflection(self.server, self._listed)
        await self.server.start()
        for name in self._names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def draining(self) -> None:
        """Health NOT_SERVING while the server still answers (a service finishing its work before
        `stop`): probes and load balancers stop sending new calls meanwhile."""
        for name in self._names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """Health NOT_SERVING, refuse new calls UNAVAILABLE, let the calls in flight finish, and
        once they have (and callers went quiet: `Drain.close`) stop, all within `grace`; calls
        still running then are cancelled."""
        await self.draining()
        end = asyncio.get_running_loop().time() + grace
        await self.drain.close(grace)
        await self.server.stop(max(0.0, end - asyncio.get_running_loop().time()))
