"""Registry fixtures: a real `python -m services.registry` process on a free port, clients of it,
and the digits demo artifacts to push."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import infra
from services.common.lifecycle import GrpcServer
from services.common.registry_client import RegistryClient
from services.pb.cnei import registry_pb2_grpc as rpb_grpc
from services.registry.core import Registry
from services.registry.servicer import RegistryServicer

SERVICE = "cnei.registry.v1.ModelRegistry"
MAX_ARTIFACT_BYTES = 256 * 1024


@dataclass
class RegistryProcess:
    proc: subprocess.Popen
    target: str
    data_dir: Path
    log: Path
    service: str = SERVICE
    max_artifact_bytes: int = MAX_ARTIFACT_BYTES

    def logged(self, text: str) -> list[str]:
        """The lines of the registry's log that hold `text`."""
        return [line for line in self.log.read_text().splitlines() if text in line]


def _wait_until_serving(target: str, proc: subprocess.Popen, log: Path) -> None:
    host, port = target.rsplit(":", 1)
    try:
        infra.wait_for_port(host, int(port), timeout=20.0, proc=proc)
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=10.0, wait_for_ready=True
            )
    except Exception as exc:
        infra.stop(proc)
        raise RuntimeError(f"registry did not start: {exc}\n{log.read_text()[-3000:]}") from exc
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def start_registry(data_dir: Path, nats_url: str, **settings: str) -> RegistryProcess:
    """`python -m services.registry` on a free port, with metrics off and these other settings
    (environment variables); returns once SERVING."""
    port = infra.free_port()
    env = {
        **os.environ,
        "CNEI_REGISTRY_HOST": "127.0.0.1",
        "CNEI_REGISTRY_PORT": str(port),
        "CNEI_REGISTRY_METRICS_PORT": "0",
        "CNEI_REGISTRY_DATA_DIR": str(data_dir),
        "CNEI_REGISTRY_NATS_URL": nats_url,
        "CNEI_REGISTRY_MAX_ARTIFACT_BYTES": str(MAX_ARTIFACT_BYTES),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        **settings,
    }
    log = data_dir.parent / f"{data_dir.name}-{port}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.registry"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    running = RegistryProcess(proc, f"127.0.0.1:{port}", data_dir, log)
    _wait_until_serving(running.target, proc, log)
    return running


@contextlib.asynccontextmanager
async def serving(registry: Registry) -> AsyncIterator[str]:
    """A real gRPC server of `registry` in this process (a core over a store the test shapes): its
    address; stopped, and `registry` closed, at the end."""
    server = GrpcServer("127.0.0.1", 0)
    server.add(rpb_grpc.add_ModelRegistryServicer_to_server, RegistryServicer(registry), SERVICE)
    await server.start()
    try:
        yield server.address
    finally:
        await server.stop(0)
        await registry.close()


@pytest.fixture(scope="module")
def registry(nats_server, tmp_path_factory) -> RegistryProcess:
    running = start_registry(tmp_path_factory.mktemp("registry") / "data", nats_server)
    yield running
    infra.stop(running.proc)


@pytest.fixture
def launch_registry(nats_server) -> Callable[..., RegistryProcess]:
    """Start registries of this test's own (blocking; from async tests use asyncio.to_thread),
    with other settings given as keywords (environment variables); any still running at the end
    are stopped."""
    started: list[RegistryProcess] = []

    def launch(data_dir: Path, **settings: str) -> RegistryProcess:
        started.append(start_registry(data_dir, nats_server, **settings))
        return started[-1]

    yield launch
    for running in started:
        infra.stop(running.proc)


@pytest.fixture
async def client(registry) -> RegistryClient:
    client = RegistryClient(registry.target, timeout=10.0)
    yield client
    await client.close()


@pytest.fixture
async def stub(registry) -> rpb_grpc.ModelRegistryStub:
    async with grpc.aio.insecure_channel(registry.target) as channel:
        yield rpb_grpc.ModelRegistryStub(channel)


@pytest.fixture
def name() -> str:
    """A model name no other test uses (a module shares one registry)."""
    return f"m-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def models(client, name, artifacts) -> dict[str, str]:
    """A fresh model of each of the module's `artifacts` (FP32, version 1): their names by key."""
    names = {key: f"{name}-{key}" for key in artifacts}
    for key, path in artifacts.items():
        await client.push_file(path, names[key], "1", "FP32")
    return names


@pytest.fixture(scope="session")
def built(digits_models) -> dict:
    return {b.precision: b for b in digits_models}
