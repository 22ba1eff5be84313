"""Starting federated jobs: a spec with NaN or infinite numbers is INVALID_ARGUMENT (through a
real grpc.aio server and stub), concurrent starts never run more jobs than the trainer's limit,
and a start that fails gives its slot back. Real Redis; the registry is an in-process stand-in
(the start only asks it whether the base version exists)."""
from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest

from services.common import lifecycle, settings as cfg
from services.common.errors import InvalidArgument, ModelNotFound, ResourceExhausted
from services.common.federated import LocalUpdate, RoundTask
from services.common.jobs import JobSpec, JobStore
from services.common.nodes import NodeDirectory, NodeInfo
from services.pb.cnei import trainer_pb2_grpc as tpb_grpc
from services.trainer.convert import spec_to_proto
from services.trainer.core import FederatedTrainer
from services.trainer.job_spec import check_spec
from services.trainer.rounds import gather_updates
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import PREFIX, TrainerSettings

FLOAT_FIELDS = [f.name for f in dataclasses.fields(JobSpec) if f.type in (float, "float", "float | None")]


class Registry:
    """Answers `resolve` after a pause (as a real one does), for the model "m" only; the job
    itself then waits at `fetch_artifact` until the test ends."""

    def __init__(self):
        self.release = asyncio.Event()

    async def resolve(self, name: str, version: str = "", precision: str = ""):
        await asyncio.sleep(0.1)
        if name != "m":
            raise ModelNotFound(name, version, precision)
        return type("Variant", (), {"version": "1", "sha256": "0" * 64})()

    async def fetch_artifact(self, sha256: str) -> bytes:
        await self.release.wait()
        raise ModelNotFound("m", "1", "FP32")


@pytest.fixture
async def trainer(own_redis):
    async def publish(subject: str, payload: dict) -> None:
        return None

    async def train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
        raise AssertionError("no round is run here")

    settings = cfg.load(TrainerSettings, PREFIX, env={}, max_running_jobs=1)
    registry = Registry()
    trainer = FederatedTrainer(settings, JobStore(own_redis), NodeDirectory(own_redis), train, registry, publish,
                               owner="trainer-under-test")
    yield trainer
    registry.release.set()
    await trainer.close()


def test_every_number_of_a_job_spec_is_checked_for_nan():
    assert {"lr", "mu", "fraction", "server_lr", "server_momentum", "round_timeout_s"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_a_job_spec_with_a_non_finite_number_is_refused_naming_it(field, value):
    with pytest.raises(InvalidArgument, match=f"federated job: {field} must be a finite number"):
        check_spec(JobSpec(strategy="fedavgm", **{field: value}))


@pytest.mark.parametrize("changes", [{"lr": float("nan")}, {"strategy": "fedavgm", "server_lr": float("nan")},
                                     {"round_timeout_s": float("inf")}], ids=["nan-lr", "nan-server-lr", "inf-timeout"])
async def test_start_job_with_a_non_finite_hyperparameter_is_invalid_argument_and_starts_nothing(trainer, changes):
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(tpb_grpc.add_TrainerServicer_to_server, TrainerServicer(trainer), "cnei.trainer.v1.Trainer")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await tpb_grpc.TrainerStub(channel).StartJob(spec_to_proto(JobSpec(model="m", **changes)), timeout=10)
    finally:
        await server.stop(0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{next(k for k in changes if k != 'strategy')} must be a finite number" in info.value.details()
    assert await trainer.list() == []


async def test_concurrent_starts_run_no_more_jobs_than_the_limit(trainer):
    results = await asyncio.gather(*[trainer.start_job(JobSpec(model="m")) for _ in range(4)],
                                   return_exceptions=True)
    started = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert (len(started), len(refused)) == (1, 3), results
    assert "the limit is 1" in str(refused[0])
    assert [job.id for job in await trainer.list()] == [started[0].id]


async def test_a_start_that_fails_gives_its_slot_back(trainer):
    with pytest.raises(ModelNotFound):
        await trainer.start_job(JobSpec(model="missing"))
    job = await trainer.start_job(JobSpec(model="m"))
    assert [j.id for j in await trainer.list()] == [job.id]


async def test_an_update_with_nan_weights_is_dropped_from_the_round():
    weights = {"W0": np.zeros((2, 2), np.float32), "B0": np.zeros(2, np.float32)}

    async def train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
        update = {k: v + 1 for k, v in task.weights.items()}
        if address == "diverged":
            update["B0"][1] = np.nan
        return LocalUpdate(address, update, 10, 0.5, 0.9, 0.01)

    nodes = [NodeInfo(node_id=n, tier="edge", region="r", address=n) for n in ("fine", "diverged")]
    updates, failures = await gather_updates(train, nodes, RoundTask("j", 1, "m", weights), timeout=5)
    assert list(updates) == ["fine"]
    assert failures == {"diverged": "INVALID_ARGUMENT: update of diverged holds NaN or infinite values in ['B0']"}
