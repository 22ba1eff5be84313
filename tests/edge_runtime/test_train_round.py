"""TrainRound through a real grpc.aio server on port 0 and a real NodeControl stub."""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from services.common import lifecycle
from services.common.errors import DeadlineExceeded
from services.common.federated import RoundTask, layers_to_named
from services.common.federated_convert import task_to_proto, tensors_from_proto, update_from_proto
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.control import NodeControlServicer
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.federated import LocalTrainer, digits_shard
from services.edge_runtime.settings import RuntimeSettings
from services.models import mlp_numpy
from services.pb.cnei import node_pb2 as npb
from services.pb.cnei import node_pb2_grpc as npb_grpc


@pytest.fixture
async def node(tmp_path):
    settings = RuntimeSettings(node_id="edge-t1", shard_index=1, shard_count=2, cache_dir=str(tmp_path))
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


def _task(model: str = "digits", sizes=(64, 16, 10), **overrides) -> RoundTask:
    weights = layers_to_named(mlp_numpy.init_layers(sizes, seed=0))
    return RoundTask(**{"job_id": "j1", "round": 1, "model": model, "weights": weights, "local_epochs": 5,
                        "lr": 0.1, "batch_size": 32, **overrides})


async def test_a_round_trains_the_global_weights_on_the_local_shard(node):
    task = _task()
    update = update_from_proto(await node.TrainRound(task_to_proto(task), timeout=60))
    x, y = digits_shard(1, 2, "iid")
    assert update.node_id == "edge-t1" and update.num_samples == len(y)
    assert {k: v.shape for k, v in update.weights.items()} == {k: v.shape for k, v in task.weights.items()}
    before = mlp_numpy.cross_entropy([(task.weights["W0"], task.weights["B0"]),
                                      (task.weights["W1"], task.weights["B1"])], x, y)
    assert update.loss < before / 2 and update.accuracy > 0.7 and update.seconds > 0
    assert not np.array_equal(update.weights["W0"], task.weights["W0"])


# A round bounds its local training: a round whose call ends first (its deadline passed, or the
# trainer cancelled it) stops training at the next mini-batch, so the node's training thread is
# free for the next round (it waited behind the abandoned one for good: one job with a huge
# local_epochs left every later job's rounds timing out).

HOURS_OF_EPOCHS = 2**31 - 1  # the most the wire's int32 holds


async def _past_its_deadline(node) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.TrainRound(task_to_proto(_task(local_epochs=HOURS_OF_EPOCHS)), timeout=1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def _cancelled_by_its_caller(node) -> None:
    call = node.TrainRound(task_to_proto(_task(local_epochs=HOURS_OF_EPOCHS)), timeout=600)
    await asyncio.sleep(1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


@pytest.mark.parametrize("end_round", [_past_its_deadline, _cancelled_by_its_caller], ids=["deadline", "cancelled"])
async def test_a_round_ended_before_its_training_is_done_frees_the_node_for_the_next_round(node, end_round):
    await end_round(node)
    started = time.monotonic()
    update = update_from_proto(await node.TrainRound(task_to_proto(_task()), timeout=20))
    assert update.num_samples > 0 and time.monotonic() - started < 5


async def test_a_round_past_its_timeout_ends_deadline_exceeded_at_the_next_mini_batch(tmp_path):
    trainer = LocalTrainer(RuntimeSettings(node_id="edge-t2", cache_dir=str(tmp_path)))
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="job j1 round 1 passed its deadline: training stopped"):
            await trainer.train_round(_task(local_epochs=HOURS_OF_EPOCHS), timeout=1)
        assert time.monotonic() - started < 3
    finally:
        trainer.close()


async def _expect(node, request, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.TrainRound(request, timeout=30)
    assert info.value.code() == code
    assert text in info.value.details()


async def test_an_unknown_model_is_not_found(node):
    await _expect(node, task_to_proto(_task(model="resnet50")), grpc.StatusCode.NOT_FOUND,
                  "no local training data for model 'resnet50'")


async def test_weights_of_the_wrong_shape_are_an_invalid_argument(node):
    await _expect(node, task_to_proto(_task(sizes=(32, 16, 10))), grpc.StatusCode.INVALID_ARGUMENT,
                  "tensor 'W0': expected 64 rows")
    await _expect(node, task_to_proto(_task(sizes=(64, 16, 3))), grpc.StatusCode.INVALID_ARGUMENT,
                  "expected 10 outputs")


async def test_bytes_that_do_not_fill_the_shape_are_an_invalid_argument(node):
    request = task_to_proto(_task())
    request.weights[1].data = request.weights[1].data[:-4]
    await _expect(node, request, grpc.StatusCode.INVALID_ARGUMENT, "tensor 'B0': shape [16] needs 64")


async def test_missing_tensors_and_bad_hyperparameters_are_invalid_arguments(node):
    request = task_to_proto(_task())
    del request.weights[-1]
    await _expect(node, request, grpc.StatusCode.INVALID_ARGUMENT, "weights must be W0, B0")
    await _expect(node, task_to_proto(_task(local_epochs=0)), grpc.StatusCode.INVALID_ARGUMENT, "local_epochs")


def test_tensors_round_trip_through_the_wire_format():
    named = {"W0": np.arange(6, dtype=np.float32).reshape(2, 3), "B0": np.array([1.5, -2.0, 0.0], np.float32)}
    request = task_to_proto(RoundTask("j", 1, "digits", named))
    back = tensors_from_proto(request.weights)
    assert list(request.weights[0].shape) == [2, 3]
    for name in named:
        np.testing.assert_array_equal(back[name], named[name])
    assert isinstance(request, npb.TrainRoundRequest)


# A node refuses a round it would only turn into NaN: a learning rate or proximal mu that is NaN
# or infinite, or global weights holding such values (the range checks alone let NaN through:
# every comparison with it is false).

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
