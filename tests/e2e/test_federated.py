"""Federated learning end to end: the trainer runs FedAvg over the mesh's two edge runtimes,
registers the result as a new version, and the coordinator serves it at once."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import nats
import numpy as np
import pytest
import tritonclient.grpc as triton
from redis.asyncio import Redis

from services.cli import infra
from services.common import events
from services.common.jobs import JobStore
from services.common.nodes import NodeDirectory, NodeInfo
from services.common.registry_client import RegistryClient
from services.models.digits import load_split
from services.pb.cnei import trainer_pb2 as tpb
from services.pb.cnei import trainer_pb2_grpc as tpb_grpc
from services.trainer.convert import job_from_proto
from tests.e2e.processes import push_digits_as, run_cnei

MODEL = "digits-fl"  # a model of its own, so the other e2e tests keep serving digits v1
EDGES = ["edge-a1", "edge-b1"]


@pytest.fixture(scope="module")
def fl_model(mesh, digits_models):
    return push_digits_as(mesh, digits_models, MODEL)


async def _run_job(mesh, **spec) -> tuple[object, list]:
    """Start a job and follow WatchJob to its end: (final job, every job seen)."""
    request = tpb.StartJobRequest(model=MODEL, local_epochs=1, lr=0.05, batch_size=32, round_timeout_s=20,
                                  **spec)
    async with grpc.aio.insecure_channel(mesh.trainer) as channel:
        stub = tpb_grpc.TrainerStub(channel)
        started = await stub.StartJob(request, timeout=10)
        seen = [job_from_proto(j) async for j in stub.WatchJob(tpb.GetJobRequest(id=started.id), timeout=120)]
    return seen[-1], seen


def _metrics(mesh) -> str:
    url = f"http://127.0.0.1:{mesh.settings.trainer_metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def _sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{name}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def _last_event(nats_url: str, subject: str) -> events.Envelope:
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.jetstream().get_last_msg(events.STREAM, subject)
        return events.decode(msg.data)
    finally:
        await nc.close()


def test_a_fedavg_job_over_both_edges_registers_a_version_the_coordinator_serves(mesh, fl_model, nats_server):
    job, seen = asyncio.run(_run_job(mesh, rounds=3, min_clients=2, fraction=1.0, strategy="fedavg"))
    assert job.state == "completed", job.error
    assert [r.round for r in job.history] == [1, 2, 3]
    assert [s.round for s in seen] == sorted(s.round for s in seen)  # WatchJob follows the rounds
    assert all(r.participants == EDGES and not r.failed for r in job.history)
    assert all(r.accuracy >= 0.85 for r in job.history)
    assert job.base_version == "1" and job.new_version == "2"
    assert job.variant_accuracy.keys() == {"FP32", "FP16", "INT8"}

    async def variants():
        client = RegistryClient(mesh.registry)
        try:
            return {v.precision: v for v in await client.list(MODEL) if v.version == "2"}
        finally:
            await client.close()

    registered = asyncio.run(variants())
    assert registered.keys() == {"FP32", "FP16", "INT8"}
    for precision in ("FP32", "INT8"):
        meta = registered[precision].metadata
        assert float(meta["accuracy"]) >= 0.85
        assert (meta["federated_job"], meta["parent_version"], meta["federated_strategy"],
                meta["federated_rounds"]) == (job.id, "1", "fedavg", "3")

    _, x_test, _, y_test = load_split()
    client = triton.InferenceServerClient(mesh.coordinator)
    for precision in ("FP32", "INT8"):
        labels = []
        for start in range(0, len(x_test), 64):  # the max_batch_size the coordinator shows
            tensor = triton.InferInput("input", [len(x_test[start:start + 64]), 64], "FP32")
            tensor.set_data_from_numpy(x_test[start:start + 64])
            result = client.infer(MODEL, [tensor], model_version="2", parameters={"precision": precision})
            assert result.get_response().model_version == "2"
            assert result.get_response().parameters["cnei_precision"].string_param == precision
            labels.extend(result.as_numpy("probabilities").argmax(axis=1))
        assert float(np.mean(np.array(labels) == y_test)) >= 0.85

    metrics = _metrics(mesh)
    assert _sample(metrics, "cnei_federated_rounds_total", f'{{model="{MODEL}",outcome="ok"}}') >= 3
    assert _sample(metrics, "cnei_federated_global_accuracy", f'{{model="{MODEL}"}}') >= 0.85
    assert _sample(metrics, "cnei_federated_update_bytes_total", '{direction="received"}') > 0

    event = asyncio.run(_last_event(nats_server, events.FEDERATED_JOB_COMPLETED))
    assert event.payload["job"] == job.id and event.payload["new_version"] == "2"
    assert "traceparent" in event.trace
    with urllib.request.urlopen(mesh.rest + "/api/status", timeout=5) as reply:
        rows = {j["id"]: j for j in json.loads(reply.read())["federated"]["jobs"]}
    assert rows[job.id]["state"] == "completed" and rows[job.id]["new_version"] == "2"
    assert rows[job.id]["round"] == rows[job.id]["rounds"] == 3


async def _with_ghost_edge(redis_url: str, coro):
    """Run `coro` while Redis lists an edge node nobody answers at (a killed client)."""
    redis = Redis.from_url(redis_url)
    directory = NodeDirectory(redis)
    ghost = NodeInfo(node_id="edge-ghost", tier="edge", region="site-z", address=f"127.0.0.1:{infra.free_port()}")
    try:
        await directory.heartbeat(ghost, ttl_seconds=60)
        return await coro
    finally:
        await directory.remove(ghost.node_id)
        await redis.aclose()


def test_a_round_completes_without_an_unreachable_client_when_min_clients_allows(mesh, fl_model, redis_server):
    before = _sample(_metrics(mesh), "cnei_federated_client_failures_total", '{reason="UNAVAILABLE"}')
    job, _ = asyncio.run(_with_ghost_edge(redis_server, _run_job(
        mesh, rounds=1, min_clients=2, fraction=1.0, strategy="fedprox", mu=0.01)))
    assert job.state == "completed", job.error
    (round_1,) = job.history
    assert round_1.participants == EDGES and round_1.failed == ["edge-ghost"]
    assert round_1.accuracy >= 0.85
    after = _sample(_metrics(mesh), "cnei_federated_client_failures_total", '{reason="UNAVAILABLE"}')
    assert after >= before + 1


def test_a_job_that_cannot_reach_min_clients_fails_with_a_clear_error(mesh, fl_model, redis_server):
    started = time.monotonic()
    job, _ = asyncio.run(_run_job(mesh, rounds=2, min_clients=5, fraction=1.0))
    assert job.state == "failed" and job.round == 0 and not job.new_version
    assert "round 1: 2 of 2 clients answered, min_clients is 5 (only 2 live clients to ask)" in job.error
    assert time.monotonic() - started < 60

    async def stored():
        redis = Redis.from_url(redis_server)
        try:
            return await JobStore(redis).get(job.id)
        finally:
            await redis.aclose()

    assert asyncio.run(stored()).state == "failed"


def test_bad_job_specs_are_invalid_arguments(mesh, fl_model):
    async def start():
        async with grpc.aio.insecure_channel(mesh.trainer) as channel:
            await tpb_grpc.TrainerStub(channel).StartJob(
                tpb.StartJobRequest(model=MODEL, strategy="scaffold"), timeout=10)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(start())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown strategy 'scaffold'" in info.value.details()


def test_a_job_for_a_model_the_registry_lacks_is_not_found(mesh):
    async def start():
        async with grpc.aio.insecure_channel(mesh.trainer) as channel:
            await tpb_grpc.TrainerStub(channel).StartJob(tpb.StartJobRequest(model="digits-nope"), timeout=10)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(start())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'digits-nope'" in info.value.details()


def test_cnei_train_start_shows_each_round_and_prints_the_new_version(mesh, fl_model):
    out = run_cnei("train", "start", "--model", MODEL, "--rounds", "2", "--min-clients", "2", "--trainer", mesh.trainer)
    assert out.returncode == 0, out.stderr
    assert "2/2 rounds accuracy" in out.stderr
    match = re.search(rf"completed: {MODEL} version (\d+) registered \(FP16=[0-9.]+ FP32=[0-9.]+ INT8=", out.stdout)
    assert match and int(match.group(1)) >= 3
    listed = run_cnei("train", "list", "--trainer", mesh.trainer, timeout=60)
    assert listed.returncode == 0 and "completed" in listed.stdout and MODEL in listed.stdout


def test_a_fedadam_job_under_differential_privacy_from_the_command_line_records_its_privacy(mesh, fl_model):
    out = run_cnei("train", "start", "--model", MODEL, "--rounds", "2", "--min-clients", "2", "--strategy", "fedadam",
                   "--dp-clip-norm", "0.5", "--dp-noise-multiplier", "0.01", "--trainer", mesh.trainer)
    assert out.returncode == 0, out.stderr
    version = re.search(rf"completed: {MODEL} version (\d+) registered", out.stdout).group(1)

    async def fp32():
        client = RegistryClient(mesh.registry)
        try:
            return await client.resolve(MODEL, version, "FP32")
        finally:
            await client.close()
    meta = asyncio.run(fp32()).metadata
    assert (meta["federated_strategy"], meta["federated_dp_clip_norm"], meta["federated_dp_noise_multiplier"]) == \
        ("fedadam", "0.5", "0.01")
    assert float(meta["accuracy"]) >= 0.8  # a little noise on a model that was already good

    bad = run_cnei("train", "start", "--model", MODEL, "--dp-noise-multiplier", "1", "--trainer", mesh.trainer,
                   timeout=60)
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "needs dp_clip_norm" in bad.stderr


def _start_trainer(mesh, redis_url: str, nats_url: str, data_dir, **extra: str) -> tuple[subprocess.Popen, str]:
    """A second trainer process of the mesh, on its own port (`extra`: more environment)."""
    port = infra.free_port()
    env = {**os.environ, **extra, "CNEI_TRAINER_PORT": str(port), "CNEI_TRAINER_METRICS_PORT": "0",
           "CNEI_TRAINER_REGISTRY_TARGET": mesh.registry, "CNEI_TRAINER_REDIS_URL": redis_url,
           "CNEI_TRAINER_NATS_URL": nats_url, "CNEI_TRAINER_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "services.trainer"], env=env,
                            stdout=open(f"{data_dir}.log", "w"), stderr=subprocess.STDOUT)
    infra.wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
    return proc, f"127.0.0.1:{port}"


async def _signal_and_watch(proc: subprocess.Popen, how: signal.Signals, store: JobStore, job_id: str,
                            left_as: str) -> tuple[object, int]:
    """Send `how` to the trainer and watch the job's record closely until the trainer has exited:
    (the first record in state `left_as` after the signal, else the last one seen; exit code).
    Another trainer of the mesh may take a job over (and even finish it) as soon as it can."""
    proc.send_signal(how)
    deadline = time.monotonic() + 20
    seen = await store.get(job_id)
    while time.monotonic() < deadline:
        seen = await store.get(job_id)
        if seen.state == left_as and (proc.poll() is not None or left_as != "running"):
            break
        if seen.done:
            break
        await asyncio.sleep(0.01)
    return seen, await asyncio.to_thread(proc.wait, 20)


async def _interrupt_a_running_job(proc: subprocess.Popen, target: str, redis_url: str) -> tuple[str, int]:
    """Start a job whose round waits on a client that never answers, SIGTERM the trainer
    mid-round: (state recorded in Redis, trainer's exit code)."""
    async with grpc.aio.insecure_channel(target) as channel:
        job = await tpb_grpc.TrainerStub(channel).StartJob(tpb.StartJobRequest(
            model=MODEL, rounds=2, min_clients=3, round_timeout_s=8), timeout=10)
    redis = Redis.from_url(redis_url)
    try:
        store = JobStore(redis)
        deadline = time.monotonic() + 20
        while (await store.get(job.id)).state != "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the round's calls are in flight
        seen, code = await _signal_and_watch(proc, signal.SIGTERM, store, job.id, "suspended")
        return seen.state, code
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def _silent_node(redis_url: str, node_id: str):
    """A live edge node that accepts connections and never speaks HTTP/2: a client that hangs."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        node = NodeInfo(node_id=node_id, tier="edge", region="site-z", address=f"127.0.0.1:{silent.getsockname()[1]}")
        redis = Redis.from_url(redis_url)
        try:
            await NodeDirectory(redis).heartbeat(node, ttl_seconds=60)
            yield node
        finally:
            await NodeDirectory(redis).remove(node_id)
            await redis.aclose()


def test_sigterm_suspends_the_running_job_for_the_next_trainer_and_exits_cleanly(mesh, fl_model, redis_server,
                                                                    nats_server, tmp_path):
    proc, target = _start_trainer(mesh, redis_server, nats_server, tmp_path)

    async def scenario():
        async with _silent_node(redis_server, "edge-silent"):
            return await _interrupt_a_running_job(proc, target, redis_server)

    try:
        started = time.monotonic()
        state, code = asyncio.run(scenario())
        assert (state, code) == ("suspended", 0)
        assert time.monotonic() - started < 30
    finally:
        infra.stop(proc)


def test_jobs_beyond_the_trainers_limit_are_refused_as_resource_exhausted(mesh, fl_model, redis_server,
                                                                         nats_server, tmp_path):
    proc, target = _start_trainer(mesh, redis_server, nats_server, tmp_path, CNEI_TRAINER_MAX_RUNNING_JOBS="1")

    async def scenario():  # a client that never answers keeps the first job's round open
        async with _silent_node(redis_server, "edge-silent-2"):
            async with grpc.aio.insecure_channel(target) as channel:
                stub = tpb_grpc.TrainerStub(channel)
                # The trainer may already run a job it took over from a trainer an earlier test
                # stopped: then the first start is the one beyond its limit.
                for spec in (dict(rounds=1, min_clients=3, round_timeout_s=60), dict(rounds=1)):
                    try:
                        await stub.StartJob(tpb.StartJobRequest(model=MODEL, **spec), timeout=10)
                    except grpc.aio.AioRpcError as refused:
                        return refused
                raise AssertionError("two jobs started on a trainer whose limit is one")

    try:
        refused = asyncio.run(scenario())
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 1" in refused.details()
    finally:
        infra.stop(proc)


@contextlib.contextmanager
def _frozen(mesh, name: str):
    """The mesh's process `name` stopped (SIGSTOP) for the block: its calls hang, then go on."""
    proc = next(c.proc for c in mesh.mesh.children if c.name == name)
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


async def _stop_after_round(mesh, target: str, redis_url: str, proc: subprocess.Popen, how: signal.Signals,
                            rounds: int, after: int, left_as: str) -> tuple[str, object]:
    """Start a job on the trainer at `target`, send it `how` once `after` rounds are recorded:
    (job id, the record as that trainer left it; see _signal_and_watch). One of the job's two
    clients is frozen from then until the trainer has gone, so the job cannot finish first
    (a round takes ~0.1 s here; a loaded machine may take longer to handle the signal)."""
    async with grpc.aio.insecure_channel(target) as channel:
        job = await tpb_grpc.TrainerStub(channel).StartJob(tpb.StartJobRequest(
            model=MODEL, rounds=rounds, min_clients=2, local_epochs=1, lr=0.05, batch_size=32,
            round_timeout_s=20), timeout=10)
    redis = Redis.from_url(redis_url)
    try:
        store = JobStore(redis)
        deadline = time.monotonic() + 60
        while (await store.get(job.id)).round < after and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with _frozen(mesh, "edge-a1"):
            seen, _ = await _signal_and_watch(proc, how, store, job.id, left_as)
        return job.id, seen
    finally:
        await redis.aclose()


async def _until_done(redis_url: str, job_id: str, timeout: float):
    redis = Redis.from_url(redis_url)
    try:
        store = JobStore(redis)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = await store.get(job_id)
            if job.done:
                return job
            await asyncio.sleep(0.2)
        raise AssertionError(f"job {job_id} still {job.state} at round {job.round} after {timeout}s")
    finally:
        await redis.aclose()


@pytest.mark.parametrize(("how", "left_as"), [(signal.SIGKILL, "running"), (signal.SIGTERM, "suspended")],
                         ids=["trainer-killed", "trainer-stopped"])
def test_a_job_whose_trainer_goes_away_is_finished_by_another_from_its_last_round(
        mesh, fl_model, redis_server, nats_server, tmp_path, how, left_as):
    rounds = 12
    first, target = _start_trainer(mesh, redis_server, nats_server, tmp_path / "a", CNEI_TRAINER_LEASE_S="2")
    try:
        job_id, left = asyncio.run(_stop_after_round(mesh, target, redis_server, first, how, rounds, 2, left_as))
    finally:
        infra.stop(first)
    assert left.state == left_as
    assert 2 <= left.round < rounds, "the job ended before its trainer was stopped: nothing to take over"
    second, _ = _start_trainer(mesh, redis_server, nats_server, tmp_path / "b", CNEI_TRAINER_LEASE_S="2")
    try:
        job = asyncio.run(_until_done(redis_server, job_id, timeout=120))
    finally:
        infra.stop(second)
    assert job.state == "completed", job.error
    # every round once, in order: the rounds done before the stop were kept, not run again
    assert [r.round for r in job.history] == list(range(1, rounds + 1))
    assert [r.accuracy for r in job.history[:left.round]] == [r.accuracy for r in left.history]
    assert all(r.accuracy >= 0.85 for r in job.history)

    async def registered():
        client = RegistryClient(mesh.registry)
        try:
            return [v for v in await client.list(MODEL) if v.metadata.get("federated_job") == job_id]
        finally:
            await client.close()

    variants = asyncio.run(registered())
    assert {v.precision for v in variants} == {"FP32", "FP16", "INT8"}
    assert {v.version for v in variants} == {job.new_version}
