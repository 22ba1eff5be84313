"""An explicit 0 for a server-optimiser setting reaches the trainer as 0 and a setting left out
takes the strategy's default, over gRPC and from `cnei train start`: a FedAvgM job given
server_momentum 0 steps as plain FedAvg, one given none keeps a momentum of 0.9. A real trainer
behind a real grpc.aio server; real Redis; clients and registry are in-process stand-ins."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from services.cli import train as train_cli
from services.cli.main import parser
from services.common import lifecycle, settings as cfg
from services.common.federated import LocalUpdate, RoundTask
from services.common.jobs import JobRecord, JobSpec, JobStore
from services.common.nodes import NodeDirectory, NodeInfo
from services.models.onnx_mlp import mlp_graph
from services.pb.cnei import trainer_pb2 as tpb
from services.pb.cnei import trainer_pb2_grpc as tpb_grpc
from services.trainer.convert import OPTIONAL, job_from_proto, spec_from_proto, spec_to_proto
from services.trainer.core import FederatedTrainer
from services.trainer.job_spec import strategy_of
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import PREFIX, TrainerSettings

BASE = {"W0": np.full((4, 3), 0.1, np.float32), "B0": np.zeros(3, np.float32)}
EVAL = (np.eye(4, dtype=np.float32)[:3], np.array([0, 1, 2]))
PULL = 0.1  # every client moves every weight by this much each round
# Optional settings whose 0 is a value of its own (not "the default"), with a value that is not 0.
PRESENT = {"server_momentum": 0.5, "server_beta2": 0.5, "mu": 0.5, "server_lr": 0.5, "server_tau": 0.5}


class Registry:
    """Version 1 of model "m" holds BASE; whatever is pushed is kept."""

    def __init__(self):
        self.versions: list[tuple[str, str, dict]] = []

    async def resolve(self, name: str, version: str = "", precision: str = ""):
        return SimpleNamespace(version="1", sha256="0" * 64)

    async def fetch_artifact(self, sha256: str) -> bytes:
        return mlp_graph([BASE["W0"]], [BASE["B0"]], name="m").SerializeToString()

    async def list(self, model: str) -> list:
        return [SimpleNamespace(version=v, precision=p, metadata=m) for v, p, m in self.versions]

    async def push_file(self, path, model, version, precision, metadata) -> None:
        self.versions.append((version, precision, dict(metadata)))


@pytest.fixture
async def mesh(own_redis, tmp_path):
    """A trainer serving gRPC over two live edge clients; `sent` holds each task sent to them."""
    nodes = NodeDirectory(own_redis)
    for n in ("edge-1", "edge-2"):
        await nodes.heartbeat(NodeInfo(node_id=n, tier="edge", region="r", address=n), ttl_seconds=60)
    sent: list[RoundTask] = []

    async def train(address: str, task: RoundTask, timeout: float) -> LocalUpdate:
        sent.append(task)
        return LocalUpdate(address, {k: v + PULL for k, v in task.weights.items()}, 10, 0.5, 0.9, 0.01)

    async def publish(subject: str, payload: dict) -> None:
        return None

    settings = cfg.load(TrainerSettings, PREFIX, env={}, data_dir=str(tmp_path))
    trainer = FederatedTrainer(settings, JobStore(own_redis), nodes, train, Registry(), publish,
                               eval_data=lambda: EVAL, owner="trainer-under-test")
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(tpb_grpc.add_TrainerServicer_to_server, TrainerServicer(trainer), "cnei.trainer.v1.Trainer")
    await server.start()
    yield SimpleNamespace(address=server.address, sent=sent, trainer=trainer)
    await server.stop(0)
    await trainer.close()


def _server_steps(sent: list[RoundTask]) -> list[float]:
    """How far the global model moved between the rounds (read from what the clients were sent)."""
    rounds = sorted({t.round: float(t.weights["B0"][0]) for t in sent}.items())
    return [round(b - a, 4) for (_, a), (_, b) in zip(rounds, rounds[1:])]


async def _job_over_grpc(mesh, **spec) -> JobRecord:
    request = tpb.StartJobRequest(**{"model": "m", "rounds": 3, "min_clients": 2, "strategy": "fedavgm", **spec})
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = tpb_grpc.TrainerStub(channel)
        started = await stub.StartJob(request, timeout=10)
        seen = [j async for j in stub.WatchJob(tpb.GetJobRequest(id=started.id), timeout=30)]
    return job_from_proto(seen[-1])


async def _job_from_the_command_line(mesh, *flags: str) -> JobRecord:
    args = parser().parse_args(["train", "start", "--trainer", mesh.address, "--model", "m", "--rounds", "3",
                                "--min-clients", "2", "--strategy", "fedavgm", *flags])
    assert await train_cli.train_start(args) == 0
    (job,) = await mesh.trainer.list()
    return job


# FedAvgM with server_lr 1: the first step is the clients' pull; then momentum 0 steps the pull
# again (FedAvg), momentum 0.9 the pull plus 0.9 of the last step.
PLAIN_FEDAVG, MOMENTUM_0_9 = [PULL, PULL], [PULL, round(PULL + 0.9 * PULL, 4)]


@pytest.mark.parametrize(("spec", "momentum", "steps"), [({"server_momentum": 0.0}, 0.0, PLAIN_FEDAVG),
                                                         ({}, None, MOMENTUM_0_9)], ids=["zero", "left-out"])
async def test_a_fedavgm_job_over_grpc_takes_an_explicit_momentum_of_zero_and_defaults_one_left_out(
        mesh, spec, momentum, steps):
    job = await _job_over_grpc(mesh, **spec)
    assert job.state == "completed", job.error
    assert _server_steps(mesh.sent) == steps
    assert job.spec.server_momentum == momentum


@pytest.mark.parametrize(("flags", "momentum", "steps"), [(["--server-momentum", "0"], 0.0, PLAIN_FEDAVG),
                                                          ([], None, MOMENTUM_0_9)], ids=["zero", "left-out"])
async def test_cnei_train_start_sends_an_explicit_server_momentum_of_zero_and_none_when_left_out(
        mesh, flags, momentum, steps):
    job = await _job_from_the_command_line(mesh, *flags)
    assert job.state == "completed", job.error
    assert _server_steps(mesh.sent) == steps
    assert job.spec.server_momentum == momentum


@pytest.mark.parametrize(("spec", "client_mu"), [({"strategy": "fedprox", "mu": 0.0}, 0.0),
                                                 ({"strategy": "fedprox"}, 0.01)], ids=["zero", "left-out"])
async def test_a_fedprox_job_over_grpc_sends_clients_an_explicit_mu_of_zero_and_defaults_one_left_out(
        mesh, spec, client_mu):
    job = await _job_over_grpc(mesh, **spec)
    assert job.state == "completed", job.error
    assert {t.mu for t in mesh.sent} == {client_mu}


@pytest.mark.parametrize("name", ["server_lr", "server_tau"])
async def test_a_server_step_or_epsilon_of_zero_over_grpc_is_refused_rather_than_taken_as_the_default(mesh, name):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _job_over_grpc(mesh, strategy="fedadam", **{name: 0.0})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{name} must be > 0" in info.value.details()
    assert await mesh.trainer.list() == []


@pytest.mark.parametrize("name", list(PRESENT))
def test_each_optional_setting_keeps_an_explicit_zero_and_a_left_out_one_on_the_wire(name):
    request = tpb.StartJobRequest(**{name: 0.0})
    assert request.HasField(name) and not tpb.StartJobRequest().HasField(name)
    assert getattr(spec_from_proto(tpb.StartJobRequest.FromString(request.SerializeToString())), name) == 0.0
    assert getattr(spec_from_proto(tpb.StartJobRequest()), name) is None
    for spec in (JobSpec(**{name: 0.0}), JobSpec(**{name: PRESENT[name]}), JobSpec()):
        assert spec_from_proto(spec_to_proto(spec)) == spec


def test_an_explicit_second_moment_decay_of_zero_is_zero_and_left_out_is_the_default():
    assert strategy_of(spec_from_proto(tpb.StartJobRequest(strategy="fedadam", server_beta2=0.0))).beta2 == 0.0
    assert strategy_of(spec_from_proto(tpb.StartJobRequest(strategy="fedadam"))).beta2 == 0.99


@pytest.mark.parametrize("flag", ["--mu", "--server-lr", "--server-momentum", "--server-beta2", "--server-tau"])
def test_cnei_train_start_sends_an_optional_setting_only_when_given(flag):
    name = flag[2:].replace("-", "_")
    given = train_cli.start_request(parser().parse_args(["train", "start", flag, "0"]))
    left_out = train_cli.start_request(parser().parse_args(["train", "start"]))
    assert given.HasField(name) and getattr(given, name) == 0.0
    assert not left_out.HasField(name)


def test_every_optional_setting_of_a_job_spec_is_optional_on_the_wire():
    optional = {f.name for f in dataclasses.fields(JobSpec) if f.default is None}
    assert optional == set(PRESENT)
    assert all(tpb.StartJobRequest.DESCRIPTOR.fields_by_name[n].has_presence for n in optional)
    assert set(OPTIONAL) == optional


def test_cnei_train_start_has_a_flag_for_every_optional_field_left_out_unless_given():
    args = parser().parse_args(["train", "start"])
    assert all(getattr(args, name) is None for name in OPTIONAL)
