"""Passing infrastructure trouble does not end a federated job: a Redis timeout or lost connection
(reading the live nodes, saving a round) or the registry answering UNAVAILABLE or
DEADLINE_EXCEEDED (the final push) is retried with growing waits from the job's last completed
round, no round lost or run twice; trouble that outlasts CNEI_TRAINER_TRANSIENT_RETRY_S suspends
the job with its checkpoint, for any trainer to go on with. Real Redis (a process of the test's
own, paused with SIGSTOP, for a real outage) and a real grpc.aio registry stand-in (it keeps what
is pushed and refuses pushes on demand) reached through the real RegistryClient; the clients and
the event bus are in-process stand-ins."""
from __future__ import annotations

import asyncio
import os
import signal

import grpc
import numpy as np
import pytest
import redis.exceptions
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.cli import infra
from services.common import lifecycle, settings as cfg
from services.common.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, ModelNotFound,
                                    Unavailable)
from services.common.federated import LocalUpdate, RoundTask
from services.common.jobs import LEASE_KEY, JobRecord, JobSpec, JobStore
from services.common.nodes import NodeDirectory, NodeInfo
from services.common.registry_client import RegistryClient
from services.pb.cnei import registry_pb2 as rpb
from services.pb.cnei import registry_pb2_grpc as rpb_grpc
from services.trainer import checkpoint, transient
from services.trainer.core import FederatedTrainer
from services.trainer.rounds import AggregateNotFinite, RoundFailed
from services.trainer.settings import PREFIX, TrainerSettings

WEIGHTS = {"W0": np.full((4, 3), 0.1, np.float32), "B0": np.zeros(3, np.float32)}
EVAL = (np.eye(4, dtype=np.float32)[:3], np.array([0, 1, 2]))
PRECISIONS = ["FP16", "FP32", "INT8"]
ROUNDS = 4  # the job is taken over after round 1: rounds 2, 3 and 4 are run here


TRANSIENT = {
    "redis-timeout": redis.exceptions.TimeoutError("Timeout reading from socket"),
    "redis-connection": redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379"),
    "redis-loading": redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    "registry-unavailable": Unavailable("registry 127.0.0.1:50051: failed to connect to all addresses"),
    "registry-deadline": DeadlineExceeded("Deadline Exceeded"),
    "socket-timeout": TimeoutError(),
    "redis-readonly": redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    "redis-readonly-in-a-script": redis.exceptions.ResponseError(
        "Error running script (call to f_5e1b...): @user_script:3: @user_script: 3: -READONLY You can't write "
        "against a read only replica."),
    "redis-masterdown": redis.exceptions.ResponseError("MASTERDOWN Link with MASTER is down"),
    "redis-oom": redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
}
THE_JOB_S_OWN = {
    "too-few-clients": RoundFailed(3, 1, 2, 2, {"edge-2": "no update within 30s"}),
    "aggregate-not-finite": AggregateNotFinite(3, "fedavgm", ["W0"]),
    "base-version-missing": ModelNotFound("m", "7"),
    "no-free-version": AlreadyExists("could not find a free version of model 'm' to register"),
    "bad-artifact": FailedPrecondition("artifact sha256 mismatch"),
    "bad-update-shapes": InvalidArgument("update of edge-1: shapes differ"),
    "a-bug": KeyError("W0"),
    "redis-refuses-the-script": redis.exceptions.ResponseError("NOSCRIPT No matching script"),
}


@pytest.mark.parametrize("exc", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_infrastructure_trouble_is_transient(exc):
    assert transient.is_transient(exc)


@pytest.mark.parametrize("exc", THE_JOB_S_OWN.values(), ids=THE_JOB_S_OWN.keys())
def test_the_job_s_own_errors_are_not_transient(exc):
    assert not transient.is_transient(exc)


class RegistryServicer(rpb_grpc.ModelRegistryServicer):
    """Lists what was pushed (metadata included); a push is refused with each code of `refuse`
    in turn, then kept."""

    def __init__(self):
        self.versions: list[tuple[str, str, dict]] = []
        self.refuse: list[grpc.StatusCode] = []

    async def ListModels(self, request, context):
        return rpb.ListModelsResponse(models=[rpb.ModelVersion(name=request.name, version=v, precision=p, metadata=m)
                                              for v, p, m in self.versions])

    async def PushModel(self, request_iterator, context):
        header = None
        async for chunk in request_iterator:
            if chunk.HasField("header"):
                header = chunk.header
        if self.refuse:
            await context.abort(self.refuse.pop(0), "the registry is restarting")
        self.versions.append((header.version, header.precision, dict(header.metadata)))
        return rpb.ModelVersion(name=header.name, version=header.version, precision=header.precision,
                                metadata=header.metadata)


@pytest.fixture
async def registry():
    servicer = RegistryServicer()
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(rpb_grpc.add_ModelRegistryServicer_to_server, servicer, "cnei.registry.v1.ModelRegistry")
    await server.start()
    client = RegistryClient(server.address, timeout=5.0)
    client.servicer = servicer
    yield client
    await client.close()
    await server.stop(0)


class Mesh:
    """Two live edge clients, a job taken over after round 1 of ROUNDS, and trainers sharing Redis;
    records the rounds trained with the first weight each round was given."""

    def __init__(self, redis: Redis, tmp_path):
        self.redis, self.tmp_path = redis, tmp_path
        self.store, self.nodes = JobStore(redis), NodeDirectory(redis)
        self.job = JobRecord(spec=JobSpec(model="m", rounds=ROUNDS, min_clients=2, round_timeout_s=30),
                             state="suspended", round=1)
        self.trained: list[tuple[int, float]] = []
        self.on_train = None

    async def start(self) -> None:
        for n in ("edge-1", "edge-2"):
            await self.nodes.heartbeat(NodeInfo(node_id=n, tier="edge", region="r", address=n), ttl_seconds=60)
        await self.store.save(self.job, checkpoint.encode(WEIGHTS))

    def trainer(self, owner: str, registry, store: JobStore | None = None, nodes: NodeDirectory | None = None,
                **settings) -> FederatedTrainer:
        async def train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
            self.trained.append((task.round, float(task.weights["W0"][0, 0])))
            if self.on_train is not None:
                await self.on_train(task)
            await asyncio.sleep(0.02)
            return LocalUpdate(address, {k: v + 0.01 for k, v in task.weights.items()}, 10, 0.5, 0.9, 0.01)

        async def publish(subject: str, payload: dict) -> None:
            return None

        values = {"transient_wait_s": 0.05, "transient_retry_s": 30.0, "data_dir": str(self.tmp_path / owner),
                  **settings}
        return FederatedTrainer(cfg.load(TrainerSettings, PREFIX, env={}, **values), store or self.store,
                                nodes or self.nodes, train, registry, publish, eval_data=lambda: EVAL, owner=owner)

    async def run(self, trainer: FederatedTrainer, timeout: float = 30) -> JobRecord:
        assert await trainer.resume_unfinished() == [self.job.id]
        await asyncio.wait_for(trainer.background.wait(), timeout)
        return await self.store.get(self.job.id)

    def assert_each_round_trained_once_on_the_last_one_s_weights(self) -> None:
        """Rounds 2..ROUNDS, each asked of both clients once, each given the weights after the
        round before (0.1 after round 1, +0.01 a round)."""
        assert [r for r, _ in self.trained] == [r for r in range(2, ROUNDS + 1) for _ in range(2)]
        for round_no, first_weight in self.trained:
            assert first_weight == pytest.approx(0.1 + 0.01 * (round_no - 2), abs=1e-6), self.trained


def retried(model: str = "m") -> float:
    return REGISTRY.get_sample_value("cnei_federated_job_transient_errors_total",
                                     {"model": model, "action": "retried"}) or 0.0


@pytest.fixture
async def mesh(own_redis, tmp_path) -> Mesh:
    mesh = Mesh(own_redis, tmp_path)
    await mesh.start()
    return mesh


async def test_a_redis_timeout_reading_the_live_nodes_is_retried_and_the_job_completes(mesh, registry):
    class Nodes(NodeDirectory):
        calls = 0

        async def live_nodes(self):
            Nodes.calls += 1
            if Nodes.calls == 2:  # round 3
                raise redis.exceptions.TimeoutError("Timeout reading from socket")
            return await super().live_nodes()

    before = retried()
    left = await mesh.run(mesh.trainer("A", registry, nodes=Nodes(mesh.redis)))
    assert (left.state, left.error, left.new_version) == ("completed", "", "1"), left.error
    assert [r.round for r in left.history] == [2, 3, 4]
    mesh.assert_each_round_trained_once_on_the_last_one_s_weights()
    assert retried() == before + 1


@pytest.mark.parametrize("landed", [False, True], ids=["lost-before-redis", "reply-lost-after-the-write"])
async def test_a_round_whose_save_failed_is_neither_lost_nor_run_again(mesh, registry, landed):
    class Store(JobStore):
        failed = False

        async def save(self, job, checkpoint=None, owner=""):
            if checkpoint is not None and job.round == 3 and not Store.failed:
                Store.failed = True
                if landed:
                    await super().save(job, checkpoint, owner)
                raise redis.exceptions.ConnectionError("Connection reset by peer")
            await super().save(job, checkpoint, owner)

    left = await mesh.run(mesh.trainer("A", registry, store=Store(mesh.redis)))
    assert (left.state, left.new_version) == ("completed", "1"), left.error
    assert [r.round for r in left.history] == [2, 3, 4]
    mesh.assert_each_round_trained_once_on_the_last_one_s_weights()


async def test_a_redis_failover_refusing_a_round_s_write_is_waited_out_and_the_job_completes(paused_redis, registry,
                                                                                              tmp_path):
    """A real Redis (a process of the test's own) demoted to a replica (REPLICAOF) while a round is
    written: the fenced save's script is refused READONLY; once it is primary again the round is
    written and the job goes on."""
    mesh = Mesh(paused_redis, tmp_path)
    await mesh.start()

    class Store(JobStore):
        demoted = False

        async def save(self, job, checkpoint=None, owner=""):
            if checkpoint is not None and job.round == 3 and not Store.demoted:
                Store.demoted = True
                await self.redis.execute_command("REPLICAOF", "127.0.0.1", "1")  # a primary that is not there
                try:
                    await super().save(job, checkpoint, owner)
                finally:
                    await self.redis.execute_command("REPLICAOF", "NO", "ONE")  # the failover is over
            await super().save(job, checkpoint, owner)

    before = retried()
    left = await mesh.run(mesh.trainer("A", registry, store=Store(mesh.redis)))
    assert (left.state, left.new_version) == ("completed", "1"), left.error
    assert [r.round for r in left.history] == [2, 3, 4]
    mesh.assert_each_round_trained_once_on_the_last_one_s_weights()
    assert retried() == before + 1


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
async def test_the_registry_failing_the_final_push_so_is_retried_and_the_version_registered(mesh, registry, code):
    registry.servicer.refuse = [code, code]
    left = await mesh.run(mesh.trainer("A", registry))
    assert (left.state, left.new_version) == ("completed", "1"), left.error
    assert sorted(p for v, p, _ in registry.servicer.versions) == PRECISIONS
    assert {v for v, _, _ in registry.servicer.versions} == {"1"}


async def test_trouble_outlasting_the_retry_window_suspends_the_job_with_its_checkpoint_for_any_trainer(
        mesh, registry):
    """Trainer A's registry is unreachable (nothing listens at its address): after
    transient_retry_s the job is suspended after its last round, its checkpoint kept and its
    lease released; trainer B, which reaches the registry, registers the version from it."""
    away = RegistryClient(f"127.0.0.1:{infra.free_port()}", timeout=1.0)
    try:
        left = await mesh.run(mesh.trainer("A", away, transient_retry_s=0.5))
    finally:
        await away.close()
    assert (left.state, left.round) == ("suspended", ROUNDS), left.error
    assert "suspended" in left.error and "127.0.0.1" in left.error, left.error
    assert await mesh.store.checkpoint(mesh.job.id) is not None
    assert await mesh.redis.get(LEASE_KEY.format(mesh.job.id)) is None
    assert REGISTRY.get_sample_value("cnei_federated_job_transient_errors_total",
                                     {"model": "m", "action": "suspended"}) >= 1
    done = await mesh.run(mesh.trainer("B", registry))
    assert (done.state, done.new_version, [r.round for r in done.history]) == ("completed", "1", [2, 3, 4])
    mesh.assert_each_round_trained_once_on_the_last_one_s_weights()


@pytest.fixture
async def paused_redis(tmp_path):
    """A Redis process of this test's own, with a client that gives up on an answer after 0.3 s
    (as the trainer's does after 2 s); `pause(seconds)` stops the process (SIGSTOP) that long."""
    port = infra.free_port()
    proc = infra.start_redis(port, tmp_path / "redis")
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3, socket_connect_timeout=0.3)
    loop = asyncio.get_running_loop()

    def pause(seconds: float) -> None:
        os.kill(proc.pid, signal.SIGSTOP)
        loop.call_later(seconds, os.kill, proc.pid, signal.SIGCONT)

    client.pause = pause
    yield client
    os.kill(proc.pid, signal.SIGCONT)
    await client.aclose()
    infra.stop(proc)


async def test_a_real_redis_outage_mid_job_is_waited_out_and_the_job_completes(paused_redis, registry, tmp_path):
    mesh = Mesh(paused_redis, tmp_path)
    await mesh.start()

    paused = []

    async def pause_during_round_3(task: RoundTask) -> None:
        if task.round == 3 and not paused:
            paused.append(task.round)
            paused_redis.pause(1.5)

    mesh.on_train = pause_during_round_3
    before = retried()
    left = await mesh.run(mesh.trainer("A", registry))
    assert (left.state, left.new_version) == ("completed", "1"), (left.state, left.error)
    assert retried() > before  # the outage was met (round 3's write), not slept through
    assert [r.round for r in left.history] == [2, 3, 4]
    mesh.assert_each_round_trained_once_on_the_last_one_s_weights()
