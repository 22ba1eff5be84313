"""One job record the trainer cannot read (corrupt, or of a shape a newer trainer wrote) hides no
other job: the trainer still takes the others over, ListJobs lists them, and GetJob of that one
answers FAILED_PRECONDITION naming it. Real Redis and a real grpc.aio server and stub; clients and
the event bus are in-process stand-ins."""
from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from services.common import lifecycle, settings as cfg
from services.common.federated import LocalUpdate, RoundTask
from services.common.jobs import JOB_INDEX, JOB_KEY, JobRecord, JobSpec, JobStore
from services.common.nodes import NodeDirectory, NodeInfo
from services.pb.cnei import trainer_pb2 as tpb
from services.pb.cnei import trainer_pb2_grpc as tpb_grpc
from services.trainer import checkpoint
from services.trainer.core import FederatedTrainer
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import PREFIX, TrainerSettings

WEIGHTS = {"W0": np.full((4, 3), 0.1, np.float32), "B0": np.zeros(3, np.float32)}
EVAL = (np.eye(4, dtype=np.float32)[:3], np.array([0, 1, 2]))


async def train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
    await asyncio.sleep(0.05)
    return LocalUpdate(address, {k: v + 0.01 for k, v in task.weights.items()}, 10, 0.5, 0.9, 0.01)


async def publish(subject: str, payload: dict) -> None:
    return None


@pytest.fixture
async def trainer(own_redis):
    nodes = NodeDirectory(own_redis)
    await nodes.heartbeat(NodeInfo(node_id="edge-1", tier="edge", region="r", address="edge-1"), ttl_seconds=60)
    settings = cfg.load(TrainerSettings, PREFIX, env={})
    trainer = FederatedTrainer(settings, JobStore(own_redis), nodes, train, registry=None, publish=publish,
                               eval_data=lambda: EVAL, owner="trainer-under-test")
    yield trainer
    await trainer.close()


@pytest.fixture
async def stub(trainer):
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(tpb_grpc.add_TrainerServicer_to_server, TrainerServicer(trainer), "cnei.trainer.v1.Trainer")
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield tpb_grpc.TrainerStub(channel)
    await server.stop(0)


async def _jobs(redis) -> tuple[JobRecord, str]:
    """A suspended job after round 1 of 50, and beside it a record from a newer trainer whose
    rounds carry a field this one does not know, and a corrupt record (its id)."""
    store = JobStore(redis)
    job = JobRecord(spec=JobSpec(model="m", rounds=50), state="suspended", round=1)
    await store.save(job, checkpoint.encode(WEIGHTS))
    newer = JobRecord(spec=JobSpec(model="m", rounds=50), state="completed", round=1, created_at=job.created_at + 1)
    data = json.loads(newer.to_json())
    data["history"] = [{"round": 1, "participants": ["a"], "failed": [], "accuracy": 0.5, "loss": 1.0,
                        "seconds": 1.0, "attempt": 1, "client_metrics": {"a": {"loss": 1.0}}}]
    await redis.set(JOB_KEY.format(newer.id), json.dumps(data))
    await redis.zadd(JOB_INDEX, {newer.id: newer.created_at, "corrupt": job.created_at + 2})
    await redis.set(JOB_KEY.format("corrupt"), b'{"spec": {"model": "m"}, "history": [{"round": 1}]}')
    return job, newer.id


async def test_an_unreadable_record_does_not_stop_the_trainer_taking_the_other_jobs_over(trainer, own_redis):
    job, _ = await _jobs(own_redis)
    assert await trainer.resume_unfinished() == [job.id]


async def test_list_jobs_lists_the_others_and_get_job_names_the_unreadable_one(trainer, stub, own_redis):
    job, newer = await _jobs(own_redis)
    listed = await stub.ListJobs(tpb.ListJobsRequest(), timeout=10)
    assert sorted(j.id for j in listed.jobs) == sorted([job.id, newer])
    assert [r.round for r in (await stub.GetJob(tpb.GetJobRequest(id=newer), timeout=10)).history] == [1]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetJob(tpb.GetJobRequest(id="corrupt"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "federated job 'corrupt': its record cannot be read" in info.value.details()
