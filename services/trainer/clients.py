"""Outbound TrainRound calls to the runtimes' NodeControl service, speaking domain types."""
from __future__ import annotations

import grpc

from services.common import grpc_util
from services.common.federated import LocalUpdate, RoundTask, named_bytes
from services.common.federated_convert import task_to_proto, update_from_proto
from services.pb.cnei import node_pb2_grpc as npb_grpc
from services.trainer.metrics import UPDATE_BYTES


class NodeClients:
    """One traced channel per node address, reused across rounds and jobs."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> npb_grpc.NodeControlStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc_util.channel(address)
        return npb_grpc.NodeControlStub(channel)

    async def train(self, address: str, task: RoundTask, timeout: float) -> LocalUpdate:
        """One local round on the node at `address`; failures raise CneiError subclasses."""
        request = task_to_proto(task)
        UPDATE_BYTES.labels("sent").inc(named_bytes(task.weights))
        try:
            reply = await self._stub(address).TrainRound(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc, f"node {address}") from None
        update = update_from_proto(reply)
        UPDATE_BYTES.labels("received").inc(named_bytes(update.weights))
        return update

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
