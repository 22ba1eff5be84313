"""A trainer shutting down starts no job it would then abandon: StartJob is UNAVAILABLE from the
moment its core begins to close (through a real grpc.aio server and stub), a start already past
its checks when the shutdown begins is refused before anything is recorded, and close() waits for
it. Real Redis; the registry is an in-process stand-in (a start only asks it whether the base
version exists)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common import lifecycle, settings as cfg
from services.common.errors import Unavailable
from services.common.federated import LocalUpdate, RoundTask
from services.common.jobs import JobSpec, JobStore
from services.common.nodes import NodeDirectory
from services.pb.cnei import trainer_pb2_grpc as tpb_grpc
from services.trainer.convert import spec_to_proto
from services.trainer.core import FederatedTrainer
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import PREFIX, TrainerSettings


class Registry:
    """`resolve` answers once `answer` is set; the job itself waits at `fetch_artifact` for good."""

    def __init__(self):
        self.asked, self.answer = asyncio.Event(), asyncio.Event()

    async def resolve(self, name: str, version: str = "", precision: str = ""):
        self.asked.set()
        await self.answer.wait()
        return type("Variant", (), {"version": "1", "sha256": "0" * 64})()

    async def fetch_artifact(self, sha256: str) -> bytes:
        await asyncio.sleep(3600)


async def publish(subject: str, payload: dict) -> None:
    return None


async def train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
    raise AssertionError("no round is run here")


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture
async def trainer(own_redis, registry):
    settings = cfg.load(TrainerSettings, PREFIX, env={})
    trainer = FederatedTrainer(settings, JobStore(own_redis), NodeDirectory(own_redis), train, registry, publish,
                               owner="trainer-under-test")
    yield trainer
    registry.answer.set()
    await trainer.close()


async def test_start_job_on_a_trainer_shutting_down_is_unavailable_and_starts_nothing(trainer, registry):
    registry.answer.set()
    running = await trainer.start_job(JobSpec(model="m"))  # waits at fetch_artifact until cancelled
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(tpb_grpc.add_TrainerServicer_to_server, TrainerServicer(trainer), "cnei.trainer.v1.Trainer")
    await server.start()
    try:
        await trainer.close()
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await tpb_grpc.TrainerStub(channel).StartJob(spec_to_proto(JobSpec(model="m")), timeout=10)
    finally:
        await server.stop(0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in info.value.details()
    assert [(j.id, j.state) for j in await trainer.list()] == [(running.id, "suspended")]
    assert not trainer.background.tasks


async def test_a_start_in_flight_when_the_trainer_closes_is_refused_and_waited_for(trainer, registry):
    start = asyncio.create_task(trainer.start_job(JobSpec(model="m")))
    await asyncio.wait_for(registry.asked.wait(), 5)
    closing = asyncio.create_task(trainer.close())
    await asyncio.sleep(0.3)
    assert not closing.done(), "close() did not wait for the start in flight"
    registry.answer.set()
    await asyncio.wait_for(closing, 5)
    assert start.done()
    with pytest.raises(Unavailable, match="shutting down"):
        start.result()
    assert await trainer.list() == []
    assert not trainer.background.tasks


async def test_a_job_started_just_before_the_trainer_closes_is_recorded_suspended(trainer, registry, own_redis):
    """close() right after start_job returned, before the job's task first ran: a task cancelled
    then never runs its handler, and the job was left `pending` under a lease nobody renewed."""
    registry.answer.set()
    job = await trainer.start_job(JobSpec(model="m"))
    await trainer.close()
    left = await JobStore(own_redis).get(job.id)
    assert (left.state, left.round) == ("suspended", 0), left
    assert await JobStore(own_redis).claim(job.id, "next-trainer", 5.0)  # its lease was released
