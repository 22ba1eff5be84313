"""Collecting a round's updates: late clients dropped, a stopped round stops its clients' calls."""
from __future__ import annotations

import asyncio

import numpy as np

from services.common.federated import LocalUpdate, RoundTask
from services.common.nodes import NodeInfo
from services.trainer.rounds import gather_updates

WEIGHTS = {"W0": np.zeros((2, 2), np.float32), "B0": np.zeros(2, np.float32)}
NODES = [NodeInfo(node_id=n, tier="edge", region="r", address=n) for n in ("fast", "hung")]
TASK = RoundTask(job_id="j", round=1, model="m", weights=WEIGHTS)


class Clients:
    """`fast` answers at once; `hung` never does. Records which calls were cancelled."""

    def __init__(self):
        self.cancelled: list[str] = []
        self.started = asyncio.Event()

    async def train(self, address: str, task: RoundTask, timeout: float) -> LocalUpdate:
        if address == "hung":
            self.started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.append(address)
                raise
        return LocalUpdate(address, {k: v + 1 for k, v in task.weights.items()}, 10, 0.5, 0.9, 0.01)


def test_a_client_still_busy_at_the_timeout_is_dropped_and_its_call_cancelled():
    async def scenario():
        clients = Clients()
        updates, failures = await gather_updates(clients.train, NODES, TASK, timeout=0.2)
        return updates, failures, list(clients.cancelled)

    updates, failures, cancelled = asyncio.run(scenario())
    assert list(updates) == ["fast"] and updates["fast"].num_samples == 10
    assert failures == {"hung": "no update within 0.2s"}
    assert cancelled == ["hung"]


def test_a_cancelled_round_cancels_the_calls_it_made():
    async def scenario():
        clients = Clients()
        round_task = asyncio.create_task(gather_updates(clients.train, NODES, TASK, timeout=60))
        await clients.started.wait()
        round_task.cancel()
        try:
            await round_task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the round was not cancelled")
        await asyncio.sleep(0)  # the cancelled call runs its handler
        return list(clients.cancelled)  # a copy: asyncio.run cancels leftover tasks on its way out

    assert asyncio.run(scenario()) == ["hung"]
