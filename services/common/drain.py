"""Graceful stop of a gRPC server: once closing, new calls are refused UNAVAILABLE (clients retry
them elsewhere) while the calls in flight finish. grpc-python's own `stop(grace)` cancels every
call its transport has taken in but not yet handed to a handler (a burst of concurrent requests
leaves many), and clients do not retry CANCELLED; refusing them first, then stopping once the
calls in hand are answered and the callers have gone quiet, leaves none to cancel."""
from __future__ import annotations

import asyncio
import inspect
import time

import grpc

from services.common.grpc_util import refusing, rewrapped

# answered as ever while closing, and not waited for (a health Watch lasts as long as its client)
EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REFUSAL = "server is shutting down"
QUIET_S = 0.25  # no new call for this long: callers have noticed, the server may stop


class Drain(grpc.aio.ServerInterceptor):
    """Counts the calls in flight; after `close` refuses new ones and waits for those in hand."""

    def __init__(self) -> None:
        self.closing = False
        self.inflight = 0
        self.last_call = 0.0  # monotonic time of the latest call to arrive, refused ones too
        self._idle = asyncio.Event()
        self._idle.set()

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(EXEMPT):
            return await continuation(handler_call_details)
        self.last_call = time.monotonic()
        if self.closing:
            handler = await continuation(handler_call_details)
            return refusing(handler, grpc.StatusCode.UNAVAILABLE, REFUSAL)
        self._enter()  # in hand from here: the interceptors after this one may hold it a while
        try:
            handler = await continuation(handler_call_details)
        except BaseException:
            self._leave()
            raise
        if handler is None:
            self._leave()
            return None
        return rewrapped(handler, self._counted)

    def _enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def _counted(self, behaviour, streaming: bool):
        """`behaviour` that leaves the count of calls in flight when it ends."""
        if streaming and inspect.isasyncgenfunction(behaviour):  # else it writes its replies itself
            async def stream(request_or_iterator, context):
                try:
                    async for reply in behaviour(request_or_iterator, context):
                        yield reply
                finally:
                    self._leave()
            return stream

        async def unary(request_or_iterator, context):
            try:
                return await behaviour(request_or_iterator, context)
            finally:
                self._leave()
        return unary

    async def close(self, grace_s: float, quiet_s: float = QUIET_S) -> None:
        """Refuse new calls from now on; return once the calls in flight have ended and no call
        has come for `quiet_s`, or after `grace_s` whatever is left."""
        self.closing = True
        end = time.monotonic() + grace_s
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except asyncio.TimeoutError:
            return
        while (left := end - time.monotonic()) > 0:
            since = time.monotonic() - self.last_call
            if since >= quiet_s:
                return
            await asyncio.sleep(min(quiet_s - since, left))
