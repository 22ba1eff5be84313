"""A node refuses a federated round it would only turn into NaN: a learning rate or proximal mu
that is NaN or infinite, or global weights holding such values, are INVALID_ARGUMENT at TrainRound
(the range checks alone let NaN through: every comparison with it is false). A real grpc.aio
NodeControl server on port 0 and a real stub."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from services.common import lifecycle
from services.common.federated import RoundTask, layers_to_named
from services.common.federated_convert import task_to_proto
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.control import NodeControlServicer
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.federated import LocalTrainer
from services.edge_runtime.settings import RuntimeSettings
from services.models import mlp_numpy
from services.pb.cnei import node_pb2_grpc as npb_grpc


@pytest.fixture
async def node(tmp_path):
    settings = RuntimeSettings(node_id="edge-t1", shard_index=0, shard_count=2, cache_dir=str(tmp_path))
    registry = RegistryClient("127.0.0.1:1")  # TrainRound never asks the registry
    runtime = EdgeRuntime(settings, registry, DiskCache(tmp_path))
    trainer = LocalTrainer(settings)
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(npb_grpc.add_NodeControlServicer_to_server, NodeControlServicer(runtime, trainer),
               "cnei.node.v1.NodeControl")
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    yield npb_grpc.NodeControlStub(channel)
    await channel.close()
    await server.stop(0)
    trainer.close()
    runtime.close()
    await registry.close()


def _task(**overrides) -> RoundTask:
    weights = layers_to_named(mlp_numpy.init_layers((64, 16, 10), seed=0))
    return RoundTask(**{"job_id": "j1", "round": 1, "model": "digits", "weights": weights, "local_epochs": 1,
                        "lr": 0.1, "batch_size": 32, **overrides})


@pytest.mark.parametrize("changes", [{"lr": float("nan")}, {"lr": float("inf")}, {"mu": float("nan")},
                                     {"mu": float("inf")}], ids=["nan-lr", "inf-lr", "nan-mu", "inf-mu"])
async def test_a_round_with_a_non_finite_learning_rate_or_mu_is_invalid_argument(node, changes):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.TrainRound(task_to_proto(_task(**changes)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lr > 0 and mu >= 0 (finite)" in info.value.details()


async def test_a_round_over_global_weights_holding_nan_is_invalid_argument(node):
    task = _task()
    task.weights["W1"][3, 4] = np.nan
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.TrainRound(task_to_proto(task), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "global weights ['W1'] hold NaN or infinite values" in info.value.details()
