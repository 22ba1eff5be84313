"""A trainer shutting down suspends its jobs even when the cancellation it sends is lost (on
Python 3.11 asyncio.wait_for, which nats-py's publish uses, drops a cancel that lands as its
future completes), and with the checkpoint of the round its record names even when the
cancellation stopped that round's own write. Real Redis; clients and the event bus are in-process
stand-ins."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.common import events, settings as cfg
from services.common.federated import LocalUpdate, RoundTask
from services.common.jobs import JobRecord, JobSpec, JobStore
from services.common.nodes import NodeDirectory, NodeInfo
from services.trainer import checkpoint
from services.trainer.core import FederatedTrainer
from services.trainer.settings import PREFIX, TrainerSettings

WEIGHTS = {"W0": np.full((4, 3), 0.1, np.float32), "B0": np.zeros(3, np.float32)}
EVAL = (np.eye(4, dtype=np.float32)[:3], np.array([0, 1, 2]))


@pytest.fixture
def redis(own_redis):
    """A database of its own: the mesh's trainers (later e2e tests) must not find this job."""
    return own_redis


async def train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
    await asyncio.sleep(0.01)
    return LocalUpdate(address, {k: v + 0.01 for k, v in task.weights.items()}, 10, 0.5, 0.9, 0.01)


def _trainer(store: JobStore, nodes: NodeDirectory, train_fn, publish) -> FederatedTrainer:
    settings = cfg.load(TrainerSettings, PREFIX, env={}, lease_s=10.0)
    return FederatedTrainer(settings, store, nodes, train_fn, registry=None, publish=publish,
                            eval_data=lambda: EVAL, owner="trainer-under-test")


async def _resume_until_closed(trainer: FederatedTrainer, closing: list[asyncio.Task], within_s: float) -> list[str]:
    """The trainer resumes the unfinished jobs and runs them until the test's close() (the first of
    `closing`) has suspended them: the ids resumed."""
    resumed = await trainer.resume_unfinished()
    await asyncio.wait_for(trainer.background.wait(), within_s)
    await asyncio.wait_for(closing[0], 5)
    return resumed


async def test_a_lost_cancellation_still_suspends_the_job_after_the_round_in_progress(redis):
    store, nodes = JobStore(redis), NodeDirectory(redis)
    for n in ("edge-1", "edge-2"):
        await nodes.heartbeat(NodeInfo(node_id=n, tier="edge", region="r", address=n), ttl_seconds=60)
    job = JobRecord(spec=JobSpec(model="m", rounds=50, min_clients=2), state="suspended", round=1)
    await store.save(job, checkpoint.encode(WEIGHTS))
    trainer = None
    closing: list[asyncio.Task] = []

    async def publish(subject: str, payload: dict) -> None:
        # after round 3, the trainer is told to shut down while this "publish" is in flight,
        # and the cancellation that reaches it here is swallowed, as wait_for does
        if subject == events.FEDERATED_ROUND_COMPLETED and payload["round"] == 3:
            closing.append(asyncio.create_task(trainer.close()))
            try:
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                pass

    trainer = _trainer(store, nodes, train, publish)
    assert await _resume_until_closed(trainer, closing, 30) == [job.id]
    left = await store.get(job.id)
    assert (left.state, left.round) == ("suspended", 3), (left.state, left.round, left.error)
    assert [r.round for r in left.history] == [2, 3]
    assert await store.claim(job.id, "next-trainer", 5.0)  # its lease was released for the next one


async def test_a_cancellation_lost_inside_a_round_is_sent_again(redis):
    """The cancel lands while the job reads the live nodes and is lost there; the round then
    waits on a client that does not answer: close() cancels again instead of waiting it out."""
    job = JobRecord(spec=JobSpec(model="m", rounds=50, min_clients=2, round_timeout_s=60), state="suspended", round=1)
    store = JobStore(redis)
    await store.save(job, checkpoint.encode(WEIGHTS))
    trainer = None
    closing: list[asyncio.Task] = []

    class Directory(NodeDirectory):
        calls = 0

        async def live_nodes(self):
            Directory.calls += 1
            if Directory.calls == 3:  # the third round run here (round 4)
                closing.append(asyncio.create_task(trainer.close()))
                try:
                    await asyncio.sleep(0.2)
                except asyncio.CancelledError:
                    pass  # lost
            return await super().live_nodes()

    async def slow_train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
        if task.round == 4:
            await asyncio.sleep(3600)
        return await train(address, task, timeout)

    nodes = Directory(redis)
    for n in ("edge-1", "edge-2"):
        await nodes.heartbeat(NodeInfo(node_id=n, tier="edge", region="r", address=n), ttl_seconds=60)

    async def publish(subject: str, payload: dict) -> None:
        return None

    trainer = _trainer(store, nodes, slow_train, publish)
    await _resume_until_closed(trainer, closing, 10)  # not the round's 60 s
    left = await store.get(job.id)
    assert (left.state, left.round) == ("suspended", 3), (left.state, left.round, left.error)


async def test_a_job_suspended_while_its_round_was_being_written_keeps_that_round_s_checkpoint(redis):
    """The cancel lands before the round-3 write reaches Redis: the suspended record says round 3,
    so the checkpoint beside it must hold the weights after round 3, not round 2 (the next trainer
    would go on from round 2's weights as if round 3 were done: round 3's updates lost)."""
    trainer = None
    closing: list[asyncio.Task] = []

    class Store(JobStore):
        async def save(self, job, checkpoint=None, owner=""):
            if checkpoint is not None and job.round == 3 and not closing:
                closing.append(asyncio.create_task(trainer.close()))
                await asyncio.sleep(1.0)  # not yet sent when the cancel lands
            await super().save(job, checkpoint, owner)

    store, nodes = Store(redis), NodeDirectory(redis)
    for n in ("edge-1", "edge-2"):
        await nodes.heartbeat(NodeInfo(node_id=n, tier="edge", region="r", address=n), ttl_seconds=60)
    job = JobRecord(spec=JobSpec(model="m", rounds=50, min_clients=2), state="suspended", round=1)
    await store.save(job, checkpoint.encode(WEIGHTS))

    async def publish(subject: str, payload: dict) -> None:
        return None

    trainer = _trainer(store, nodes, train, publish)
    assert await _resume_until_closed(trainer, closing, 30) == [job.id]
    left = await store.get(job.id)
    weights, _ = checkpoint.decode(await store.checkpoint(job.id))
    assert (left.state, [r.round for r in left.history]) == ("suspended", [2, 3]), left.error
    np.testing.assert_allclose(weights["W0"], WEIGHTS["W0"] + 0.01 * 2, rtol=1e-6)  # rounds 2 and 3
