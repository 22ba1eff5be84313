"""Outbound calls to a runtime's NodeControl service (load, unload), one traced channel per node
address, speaking domain terms; the trainer adds its federated rounds on top."""
from __future__ import annotations

import grpc

from services.common import grpc_util
from services.pb.cnei import node_pb2 as npb
from services.pb.cnei import node_pb2_grpc as npb_grpc


class NodeControlClients:
    def __init__(self, channels: grpc_util.Channels) -> None:
        """`channels`: to the runtimes (their headers and TLS), shared with other clients of them."""
        self.channels = channels

    def _stub(self, address: str) -> npb_grpc.NodeControlStub:
        return npb_grpc.NodeControlStub(self.channels.get(address))

    async def call(self, address: str, method: str, request, timeout: float):
        """NodeControl `method` on the node at `address`; failures raise CneiError subclasses."""
        try:
            return await getattr(self._stub(address), method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc, f"node {address}") from None

    async def load(self, address: str, name: str, version: str, precision: str, timeout: float) -> float:
        """Load the variant on the node (pulled from the registry if it must be): its load seconds."""
        request = npb.LoadModelRequest(name=name, version=version, precision=precision)
        return (await self.call(address, "LoadModel", request, timeout)).load_seconds

    async def unload(self, address: str, name: str, version: str, precision: str, timeout: float) -> bool:
        """Drop the variant from the node's memory: whether it was loaded there."""
        request = npb.UnloadModelRequest(name=name, version=version, precision=precision)
        return (await self.call(address, "UnloadModel", request, timeout)).unloaded

    async def close(self) -> None:
        await self.channels.close()
