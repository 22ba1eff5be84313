"""Emulated heterogeneity for benchmarks: a slower CPU and a longer network path to the node."""
from __future__ import annotations

import asyncio

import grpc


class DelayInterceptor(grpc.aio.ServerInterceptor):
    """Holds every incoming RPC (health checks included) for `delay_ms` before handling it."""

    def __init__(self, delay_ms: float):
        self.delay_s = delay_ms / 1000.0

    async def intercept_service(self, continuation, handler_call_details):
        await asyncio.sleep(self.delay_s)
        return await continuation(handler_call_details)


def slowed(run, slowdown: float):
    """Wrap a blocking run function so it takes `slowdown` times as long (busy, like a slower CPU)."""
    import time

    if slowdown <= 1.0:
        return run

    def run_slowly(*args, **kwargs):
        start = time.perf_counter()
        result = run(*args, **kwargs)
        extra = (time.perf_counter() - start) * (slowdown - 1.0)
        end = time.perf_counter() + extra
        while time.perf_counter() < end:
            pass
        return result
    return run_slowly
