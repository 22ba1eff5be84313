"""Outbound TrainRound calls to the runtimes' NodeControl service, speaking domain types."""
from __future__ import annotations

from services.common.federated import LocalUpdate, RoundTask, named_bytes
from services.common.federated_convert import task_to_proto, update_from_proto
from services.common.node_control import NodeControlClients
from services.trainer.metrics import UPDATE_BYTES


class NodeClients(NodeControlClients):
    """One traced channel per node address, reused across rounds and jobs."""

    async def train(self, address: str, task: RoundTask, timeout: float) -> LocalUpdate:
        """One local round on the node at `address`; failures raise CneiError subclasses."""
        request = task_to_proto(task)
        UPDATE_BYTES.labels("sent").inc(named_bytes(task.weights))
        reply = await self.call(address, "TrainRound", request, timeout)
        update = update_from_proto(reply)
        UPDATE_BYTES.labels("received").inc(named_bytes(update.weights))
        return update
