"""Collecting a round's updates: late clients dropped, a stopped round stops its clients' calls,
a client whose call is cancelled under it (its channel closed) is dropped like any failed one."""
from __future__ import annotations

import asyncio

import numpy as np

from services.common import grpc_util, lifecycle
from services.common.federated import LocalUpdate, RoundTask, layers_to_named
from services.common.federated_convert import update_to_proto
from services.common.nodes import NodeInfo
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.control import NodeControlServicer
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.federated import LocalTrainer
from services.edge_runtime.settings import RuntimeSettings
from services.models import mlp_numpy
from services.pb.cnei import node_pb2_grpc as npb_grpc
from services.trainer.clients import NodeClients
from services.trainer.rounds import gather_updates, run_round
from services.trainer.strategy import FedAvg

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


class Runtime(npb_grpc.NodeControlServicer):
    """A runtime's TrainRound: answers at once, or (`slow`) only after a minute."""

    def __init__(self, node_id: str, slow: bool = False):
        self.node_id, self.slow = node_id, slow
        self.called = asyncio.Event()

    async def TrainRound(self, request, context):
        self.called.set()
        if self.slow:
            await asyncio.sleep(60)
        return update_to_proto(LocalUpdate(self.node_id, {k: v + 1 for k, v in WEIGHTS.items()}, 10, 0.5, 0.9, 0.01))


async def test_a_client_whose_call_is_cancelled_under_it_is_dropped_from_the_round_not_the_job():
    """Its channel closes mid-call (retired after a TLS renewal, say, once its grace is over):
    grpc.aio raises CancelledError in that call only; the round goes on with the other client."""
    runtimes = {"fast": Runtime("fast"), "slow": Runtime("slow", slow=True)}
    servers = {}
    for node_id, runtime in runtimes.items():
        servers[node_id] = lifecycle.GrpcServer("127.0.0.1", 0)
        servers[node_id].add(npb_grpc.add_NodeControlServicer_to_server, runtime, "cnei.node.v1.NodeControl")
        await servers[node_id].start()
    clients = NodeClients(grpc_util.Channels(grace_s=0.1))
    nodes = [NodeInfo(node_id=n, tier="edge", region="r", address=s.address) for n, s in servers.items()]

    async def evaluate(weights) -> tuple[float, float]:
        return 0.5, 1.0

    try:
        round_task = asyncio.create_task(run_round(clients.train, evaluate, FedAvg(), nodes, TASK, 1, timeout=30))
        await asyncio.wait_for(runtimes["slow"].called.wait(), 10)
        clients.channels.drop(servers["slow"].address)
        outcome = await asyncio.wait_for(round_task, 10)
    finally:
        await clients.close()
        for server in servers.values():
            await server.stop(0)
    assert (outcome.record.participants, outcome.record.failed) == (["fast"], ["slow"])
    np.testing.assert_array_equal(outcome.weights["W0"], WEIGHTS["W0"] + 1)


async def test_a_round_that_times_out_leaves_a_real_runtime_free_for_the_next_round(tmp_path):
    """A runtime's training is bounded by the round: a client dropped at the round's timeout
    stops training, so the next round (another job's) is not queued behind it. A job with a
    huge local_epochs left every runtime's training thread busy for hours."""
    settings = RuntimeSettings(node_id="edge-r1", cache_dir=str(tmp_path))
    registry = RegistryClient("127.0.0.1:1")  # TrainRound never asks the registry
    runtime, trainer = EdgeRuntime(settings, registry, DiskCache(tmp_path)), LocalTrainer(settings)
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(npb_grpc.add_NodeControlServicer_to_server, NodeControlServicer(runtime, trainer),
               "cnei.node.v1.NodeControl")
    await server.start()
    clients = NodeClients(grpc_util.Channels(grace_s=0.1))
    node = [NodeInfo(node_id="edge-r1", tier="edge", region="r", address=server.address)]
    weights = layers_to_named(mlp_numpy.init_layers((64, 16, 10), seed=0))

    def task(job: str, epochs: int) -> RoundTask:
        return RoundTask(job_id=job, round=1, model="digits", weights=weights, local_epochs=epochs, batch_size=32)
    try:
        _, failures = await gather_updates(clients.train, node, task("huge", 2**31 - 1), timeout=2)
        updates, next_failures = await gather_updates(clients.train, node, task("next", 1), timeout=10)
    finally:
        await clients.close()
        await server.stop(0)
        trainer.close()
        runtime.close()
        await registry.close()
    assert failures == {"edge-r1": "no update within 2s"}
    assert (list(updates), next_failures) == (["edge-r1"], {})
