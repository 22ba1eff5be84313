"""Outbound calls to a runtime's NodeControl service (load, unload), one traced channel per node
address, speaking domain terms; the trainer adds its federated rounds on top."""
from __future__ import annotations

import grpc

from services.common import grpc_util
from services.common.tls import ClientTls
from services.pb.cnei import node_pb2 as npb
from services.pb.cnei import node_pb2_grpc as npb_grpc


class NodeControlClients:
    def __init__(self, headers: list[tuple[str, str]] | tuple = (), tls: ClientTls | None = None) -> None:
        """`headers`: sent with every call (runtimes whose node-control API is restricted);
        `tls`: the runtimes serve TLS (None: plaintext)."""
        self.headers = tuple(headers)
        self._credentials = tls.grpc_credentials() if tls else None
        self._server_name = tls.server_name if tls else ""
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> npb_grpc.NodeControlStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc_util.channel(address, self.headers, self._credentials,
                                                                   self._server_name)
        return npb_grpc.NodeControlStub(channel)

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
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
