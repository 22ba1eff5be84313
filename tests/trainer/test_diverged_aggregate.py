"""A round whose aggregate is not finite (every client update was, but the server step overflowed
float32) fails the job: nothing of it is recorded, checkpointed or registered. Real Redis; clients,
registry and event bus are in-process stand-ins."""
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
from services.trainer.job_spec import check_spec, strategy_of
from services.trainer.rounds import AggregateNotFinite, run_round
from services.trainer.settings import PREFIX, TrainerSettings

WEIGHTS = {"W0": np.full((4, 3), 0.1, np.float32), "B0": np.zeros(3, np.float32)}
EVAL = (np.eye(4, dtype=np.float32)[:3], np.array([0, 1, 2]))
NODES = [NodeInfo(node_id=n, tier="edge", region="r", address=n) for n in ("edge-1", "edge-2")]
# accepted by check_spec, but w − η·v overflows float32 for any update of 0.5
OVERFLOWING = JobSpec(model="m", rounds=2, min_clients=2, strategy="fedavgm", server_lr=1e39, server_momentum=0.5)


async def train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
    return LocalUpdate(address, {k: v + 0.5 for k, v in task.weights.items()}, 10, 0.5, 0.9, 0.01)


async def evaluate(weights) -> tuple[float, float]:
    return 0.5, 1.0


class Registry:
    """Records what the trainer would register."""

    def __init__(self):
        self.pushed: list[tuple[str, str]] = []

    async def list(self, model: str) -> list:
        return []

    async def push_file(self, path, model, version, precision, metadata) -> None:
        self.pushed.append((version, precision))


async def test_a_round_whose_aggregate_overflows_fails_naming_the_tensors():
    check_spec(OVERFLOWING)
    task = RoundTask(job_id="j", round=1, model="m", weights=WEIGHTS)
    with pytest.raises(AggregateNotFinite, match=r"round 1: the fedavgm aggregate holds NaN or infinite values "
                                                 r"in \['B0', 'W0'\]"):
        await run_round(train, evaluate, strategy_of(OVERFLOWING), NODES, task, 2, 5.0)


async def test_a_job_whose_aggregate_overflows_fails_and_keeps_its_last_finite_round(own_redis, tmp_path):
    store, nodes = JobStore(own_redis), NodeDirectory(own_redis)
    for node in NODES:
        await nodes.heartbeat(node, ttl_seconds=60)
    job = JobRecord(spec=OVERFLOWING, state="suspended", round=1)  # taken over after round 1 of 2
    await store.save(job, checkpoint.encode(WEIGHTS))
    registry, sent = Registry(), []

    async def publish(subject: str, payload: dict) -> None:
        sent.append((subject, payload))

    settings = cfg.load(TrainerSettings, PREFIX, env={}, data_dir=str(tmp_path), round_retries=0)
    trainer = FederatedTrainer(settings, store, nodes, train, registry=registry, publish=publish,
                               eval_data=lambda: EVAL, owner="trainer-under-test")
    assert await trainer.resume_unfinished() == [job.id]
    await asyncio.wait_for(trainer.background.wait(), 30)
    left = await store.get(job.id)
    assert (left.state, left.round, left.new_version, left.history) == ("failed", 1, "", [])
    assert "aggregate holds NaN or infinite values" in left.error
    assert await store.checkpoint(job.id) is None  # a failed job is never resumed: its checkpoint goes with it
    assert registry.pushed == []
    assert [s for s, _ in sent] == [events.FEDERATED_JOB_FAILED]
