"""What a runtime asks of the world, counted: the RPCs a real in-process registry server answers
(a gRPC server interceptor), and the sweeps and manifest reads of a disk cache (CNEI's own
DiskCache, subclassed)."""
from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from services.common.lifecycle import GrpcServer
from services.edge_runtime.cache import DiskCache
from services.pb.cnei import registry_pb2_grpc as rpb_grpc
from services.registry.core import Registry
from services.registry.servicer import RegistryServicer
from services.registry.store import RegistryStore

SERVICE = "cnei.registry.v1.ModelRegistry"


class CountingInterceptor(grpc.aio.ServerInterceptor):
    """Counts each RPC the server is asked, by method name (`ListDeleted`); holds the next
    `stalls[method]` calls of a method `stall_s` before answering them (a registry too slow for
    its clients' deadlines)."""

    def __init__(self, stalls: Counter[str] | None = None, stall_s: float = 0.0) -> None:
        self.calls: Counter[str] = Counter()
        self.stalls = stalls if stalls is not None else Counter()
        self.stall_s = stall_s

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method.rsplit("/", 1)[-1]
        self.calls[method] += 1
        if self.stalls[method] > 0:
            self.stalls[method] -= 1
            await asyncio.sleep(self.stall_s)
        return await continuation(handler_call_details)


@contextlib.asynccontextmanager
async def counted_registry(data_dir: Path, stalls: Counter[str] | None = None,
                           stall_s: float = 0.0) -> AsyncIterator[tuple[str, Counter[str]]]:
    """A real registry gRPC server in this process over a store of its own, publishing no events
    (a runtime learns of nothing but what it asks): its address and the RPCs it was asked. The
    next `stalls[method]` calls of a method (the caller may set them later) wait `stall_s` first."""
    counter = CountingInterceptor(stalls, stall_s)
    registry = Registry(RegistryStore(data_dir))
    server = GrpcServer("127.0.0.1", 0, interceptors=[counter])
    server.add(rpb_grpc.add_ModelRegistryServicer_to_server, RegistryServicer(registry), SERVICE)
    await server.start()
    try:
        yield server.address, counter.calls
    finally:
        await server.stop(0)
        await registry.close()


class CountingDiskCache(DiskCache):
    """A disk cache that counts its sweeps for artifacts no manifest names (`forget`) and its
    reads of every manifest here (`variants`, `_cached`)."""

    def __init__(self, root: str | Path, max_bytes: int = 0):
        self.sweeps = self.manifest_reads = 0
        super().__init__(root, max_bytes)
        self.sweeps = self.manifest_reads = 0  # those of opening it left out

    def forget(self, *args, **kwargs):
        self.sweeps += 1
        return super().forget(*args, **kwargs)

    def variants(self):
        self.manifest_reads += 1
        return super().variants()

    def _cached(self):
        self.manifest_reads += 1
        return super()._cached()
