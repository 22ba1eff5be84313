"""A trainer whose job's lease another trainer took stops the job and writes, announces and
registers nothing more for it: the record and checkpoint are written only under the lease, events
and registry pushes are checked against it, a lost cancellation is sent again, and the trainer
that goes on never completes a version begun with other weights. Real Redis; clients, registry
and event bus are in-process stand-ins."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from services.common import events, settings as cfg
from services.common.federated import LocalUpdate, RoundTask
from services.common.jobs import LEASE_KEY, JobRecord, JobSpec, JobStore, LeaseLost
from services.common.nodes import NodeDirectory, NodeInfo
from services.trainer import checkpoint
from services.trainer.core import FederatedTrainer
from services.trainer.settings import PREFIX, TrainerSettings

WEIGHTS = {"W0": np.full((4, 3), 0.1, np.float32), "B0": np.zeros(3, np.float32)}
EVAL = (np.eye(4, dtype=np.float32)[:3], np.array([0, 1, 2]))
PRECISIONS = {"FP32", "FP16", "INT8"}


class Registry:
    """Keeps what was pushed; lists it back as the real registry does (metadata included)."""

    def __init__(self, versions: list[tuple[str, str, dict]] | None = None):
        self.versions = list(versions or [])
        self.pushed: list[tuple[str, str]] = []

    async def list(self, model: str) -> list:
        return [SimpleNamespace(version=v, precision=p, metadata=m) for v, p, m in self.versions]

    async def push_file(self, path, model, version, precision, metadata) -> None:
        self.versions.append((version, precision, dict(metadata)))
        self.pushed.append((version, precision))


class Mesh:
    """Two live edge clients, a job taken over after round 1 of `rounds`, trainers sharing Redis
    and a registry; records every (trainer, subject, payload) sent and (trainer, round) trained."""

    def __init__(self, redis, tmp_path, rounds: int, lease_s: float):
        self.redis, self.tmp_path, self.lease_s = redis, tmp_path, lease_s
        self.store, self.nodes = JobStore(redis), NodeDirectory(redis)
        self.job = JobRecord(spec=JobSpec(model="m", rounds=rounds, min_clients=2, round_timeout_s=60),
                             state="suspended", round=1)
        self.registry = Registry()
        self.sent: list[tuple[str, str, dict]] = []
        self.trained: list[tuple[str, int]] = []
        self.trainers: dict[str, FederatedTrainer] = {}

    async def start(self) -> None:
        for n in ("edge-1", "edge-2"):
            await self.nodes.heartbeat(NodeInfo(node_id=n, tier="edge", region="r", address=n), ttl_seconds=60)
        await self.store.save(self.job, checkpoint.encode(WEIGHTS))

    def trainer(self, owner: str, on_event=None, nodes: NodeDirectory | None = None, hang_round: int = 0):
        async def publish(subject: str, payload: dict) -> None:
            self.sent.append((owner, subject, payload))
            if on_event is not None:
                await on_event(subject, payload)

        async def train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
            self.trained.append((owner, task.round))
            await asyncio.sleep(3600 if task.round == hang_round else 0.05)
            return LocalUpdate(address, {k: v + 0.01 for k, v in task.weights.items()}, 10, 0.5, 0.9, 0.01)

        settings = cfg.load(TrainerSettings, PREFIX, env={}, lease_s=self.lease_s,
                            data_dir=str(self.tmp_path / owner))
        self.trainers[owner] = FederatedTrainer(settings, self.store, nodes or self.nodes, train, self.registry,
                                                publish, eval_data=lambda: EVAL, owner=owner)
        return self.trainers[owner]

    async def take_over(self, by: str) -> None:
        """The first trainer's lease runs out (cut off from Redis, say) and `by` takes the job."""
        await self.redis.delete(LEASE_KEY.format(self.job.id))
        assert await self.trainers[by].resume_unfinished() == [self.job.id]

    async def wait(self, timeout: float = 30) -> None:
        for trainer in self.trainers.values():
            await asyncio.wait_for(trainer.background.wait(), timeout)

    def rounds_announced(self, owner: str) -> list[int]:
        return [p["round"] for o, s, p in self.sent if o == owner and s == events.FEDERATED_ROUND_COMPLETED]


async def test_a_record_is_written_only_by_the_lease_holder(own_redis):
    store = JobStore(own_redis)
    job = JobRecord(spec=JobSpec(model="m"), state="running", round=2)
    assert await store.claim(job.id, "trainer-b", 5.0)
    await store.save(job, b"round 2 of b", owner="trainer-b")
    job.round = 3
    with pytest.raises(LeaseLost, match=f"federated job '{job.id}': trainer-a no longer holds its lease"):
        await store.save(job, b"round 3 of a", owner="trainer-a")
    assert (await store.get(job.id)).round == 2
    assert await store.checkpoint(job.id) == b"round 2 of b"
    assert await store.holds(job.id, "trainer-b") and not await store.holds(job.id, "trainer-a")


@pytest.mark.parametrize("state", ["completed", "failed"])
async def test_a_record_that_ends_drops_its_checkpoint(own_redis, state):
    store = JobStore(own_redis)
    job = JobRecord(spec=JobSpec(model="m"), state="running", round=2)
    await store.save(job, b"round 2")
    job.state = state
    await store.save(job)
    assert (await store.get(job.id)).state == state
    assert await store.checkpoint(job.id) is None


async def test_a_trainer_whose_job_was_taken_over_records_and_announces_nothing_more(own_redis, tmp_path):
    # the lease outlasts the job here: only the fenced writes can stop the first trainer
    mesh = Mesh(own_redis, tmp_path, rounds=8, lease_s=30.0)
    await mesh.start()

    async def lose_after_round_3(subject: str, payload: dict) -> None:
        if subject == events.FEDERATED_ROUND_COMPLETED and payload["round"] == 3:
            await mesh.take_over(by="B")

    mesh.trainer("A", on_event=lose_after_round_3)
    mesh.trainer("B")
    assert await mesh.trainers["A"].resume_unfinished() == [mesh.job.id]
    await mesh.wait()
    assert mesh.rounds_announced("A") == [2, 3]
    assert mesh.rounds_announced("B") == [4, 5, 6, 7, 8]
    ends = [(o, s) for o, s, _ in mesh.sent if s in (events.FEDERATED_JOB_COMPLETED, events.FEDERATED_JOB_FAILED)]
    assert ends == [("B", events.FEDERATED_JOB_COMPLETED)]
    left = await mesh.store.get(mesh.job.id)
    assert (left.state, left.round, left.new_version) == ("completed", 8, "1")
    assert [r.round for r in left.history] == [2, 3, 4, 5, 6, 7, 8]
    assert sorted(mesh.registry.pushed) == sorted(("1", p) for p in PRECISIONS)


async def test_a_lost_cancellation_still_stops_a_job_whose_lease_was_taken_before_its_next_round(own_redis,
                                                                                                tmp_path):
    mesh = Mesh(own_redis, tmp_path, rounds=8, lease_s=0.6)
    await mesh.start()

    async def lose_after_round_3_and_swallow_the_cancel(subject: str, payload: dict) -> None:
        if subject == events.FEDERATED_ROUND_COMPLETED and payload["round"] == 3:
            await mesh.take_over(by="B")
            try:  # the lease keeper notices and cancels: the cancel is lost here (as wait_for can)
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                pass

    mesh.trainer("A", on_event=lose_after_round_3_and_swallow_the_cancel)
    mesh.trainer("B")
    assert await mesh.trainers["A"].resume_unfinished() == [mesh.job.id]
    await mesh.wait()
    assert [r for o, r in mesh.trained if o == "A"] == [2, 2, 3, 3]  # no client asked for round 4 by A
    assert mesh.rounds_announced("A") == [2, 3]
    left = await mesh.store.get(mesh.job.id)
    assert (left.state, [r.round for r in left.history]) == ("completed", [2, 3, 4, 5, 6, 7, 8])


async def test_the_lease_keeper_cancels_again_a_job_whose_cancellation_was_lost_inside_a_round(own_redis, tmp_path):
    """The cancel lands while the job reads the live nodes and is lost there; the round then waits
    on clients that do not answer (60 s): the keeper cancels again instead of letting it run."""
    mesh = Mesh(own_redis, tmp_path, rounds=8, lease_s=0.6)
    await mesh.start()
    lease = LEASE_KEY.format(mesh.job.id)

    class Directory(NodeDirectory):
        calls = 0

        async def live_nodes(self):
            Directory.calls += 1
            if Directory.calls == 3:  # the third round run here (round 4)
                await own_redis.set(lease, "another-trainer")
                try:
                    await asyncio.sleep(1.0)
                except asyncio.CancelledError:
                    pass  # lost
            return await super().live_nodes()

    mesh.trainer("A", nodes=Directory(own_redis), hang_round=4)
    assert await mesh.trainers["A"].resume_unfinished() == [mesh.job.id]
    await mesh.wait(timeout=10)  # not the round's 60 s
    left = await mesh.store.get(mesh.job.id)
    assert (left.state, left.round) == ("running", 3)  # as the first trainer left it: nothing recorded since
    assert await own_redis.get(lease) == b"another-trainer"


@pytest.mark.parametrize(("begun_with", "version"), [(WEIGHTS, "1"), ({**WEIGHTS, "B0": np.ones(3, np.float32)}, "2")],
                         ids=["the-same-weights", "other-weights"])
async def test_a_version_begun_for_the_job_is_completed_only_if_it_holds_the_same_weights(own_redis, tmp_path,
                                                                                         begun_with, version):
    mesh = Mesh(own_redis, tmp_path, rounds=2, lease_s=5.0)
    mesh.job.round = 2  # every round done: the trainer that stopped was registering the version
    await mesh.start()
    begun = {"federated_job": mesh.job.id, "federated_weights_sha256": checkpoint.weights_digest(begun_with)}
    mesh.registry.versions.append(("1", "FP32", begun))
    mesh.trainer("B")
    assert await mesh.trainers["B"].resume_unfinished() == [mesh.job.id]
    await mesh.wait()
    left = await mesh.store.get(mesh.job.id)
    assert (left.state, left.new_version) == ("completed", version)
    expected = PRECISIONS - {"FP32"} if version == "1" else PRECISIONS
    assert sorted(mesh.registry.pushed) == sorted((version, p) for p in expected)
