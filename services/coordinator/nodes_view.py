"""The coordinator's periodically refreshed view of live nodes, and one channel per node."""
from __future__ import annotations

import asyncio
import logging

import grpc

from services.common import grpc_util
from services.common.nodes import NodeDirectory, NodeInfo
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class NodesView:
    """Live nodes from Redis, re-read every `refresh_s`; stale view kept through Redis outages."""

    def __init__(self, directory: NodeDirectory, refresh_s: float):
        self.directory = directory
        self.refresh_s = refresh_s
        self.nodes: list[NodeInfo] = []
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.GRPCInferenceServiceStub] = {}
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        self.nodes = await asyncio.wait_for(self.directory.live_nodes(), 1.0)

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last view
                log.warning("node refresh failed: %s", exc)
            await asyncio.sleep(self.refresh_s)

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001
            log.warning("initial node refresh failed: %s", exc)
        self._task = asyncio.create_task(self._loop(), name="nodes-view")

    def stub(self, node: NodeInfo) -> pb_grpc.GRPCInferenceServiceStub:
        stub = self._stubs.get(node.address)
        if stub is None:
            channel = grpc_util.channel(node.address)
            self._channels[node.address] = channel
            stub = self._stubs[node.address] = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()
