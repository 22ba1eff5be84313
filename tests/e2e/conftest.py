"""The whole mesh as real processes (registry, coordinator, trainer, cloud + two edge runtimes) on free
ports, against the session's real NATS and Redis, exporting traces to the Jaeger stand-in."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cli import infra
from tests.pki import make_pki
from services.cli.up import RUNTIMES, Mesh, MeshSettings, register_demo, wait_ready

REPO = Path(__file__).resolve().parents[2]
STANDIN_CANDIDATES = [
    REPO.parent / "shared/tools/jaeger-standin/server.py",
    Path("/work/shared/tools/jaeger-standin/server.py"),
]


@dataclass
class Jaeger:
    otlp: str
    query: str

    def get(self, path: str):
        with urllib.request.urlopen(self.query + path, timeout=5) as reply:
            return json.loads(reply.read())


@pytest.fixture(scope="session")
def jaeger(tmp_path_factory):
    script = next((p for p in STANDIN_CANDIDATES if p.exists()), None)
    if script is None:
        pytest.fail(f"Jaeger stand-in not found at any of {STANDIN_CANDIDATES}")
    grpc_port, http_port, query_port = infra.free_port(), infra.free_port(), infra.free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), "--otlp-grpc-port", str(grpc_port),
         "--otlp-http-port", str(http_port), "--query-port", str(query_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    infra.wait_for_port("127.0.0.1", query_port, proc=proc)
    infra.wait_for_port("127.0.0.1", grpc_port, proc=proc)
    yield Jaeger(f"http://127.0.0.1:{grpc_port}", f"http://127.0.0.1:{query_port}")
    infra.stop(proc)


@dataclass
class RunningMesh:
    settings: MeshSettings
    mesh: Mesh

    @property
    def coordinator(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    @property
    def registry(self) -> str:
        return f"127.0.0.1:{self.settings.registry_port}"

    @property
    def trainer(self) -> str:
        return f"127.0.0.1:{self.settings.trainer_port}"

    def runtime(self, node_id: str) -> str:
        index = [r[0] for r in RUNTIMES].index(node_id)
        return f"127.0.0.1:{self.settings.runtime_base_port + index}"

    def runtime_rest(self, node_id: str) -> str:
        """host:port of the node's OIP REST v2 (tritonclient.http's url)."""
        index = [r[0] for r in RUNTIMES].index(node_id)
        return f"127.0.0.1:{self.settings.runtime_http_base_port + index}"


@pytest.fixture(scope="session")
def mesh(nats_server, redis_server, jaeger, tmp_path_factory, digits_models):
    settings = MeshSettings(
        data_dir=str(tmp_path_factory.mktemp("mesh")), nats_url=nats_server, redis_url=redis_server,
        registry_port=infra.free_port(), grpc_port=infra.free_port(), http_port=infra.free_port(),
        metrics_port=infra.free_port(), registry_metrics_port=infra.free_port(),
        trainer_port=infra.free_port(), trainer_metrics_port=infra.free_port(),
        runtime_base_port=infra.free_ports(len(RUNTIMES)), runtime_http_base_port=infra.free_ports(len(RUNTIMES)),
        runtime_metrics_base_port=infra.free_ports(len(RUNTIMES)),
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp)
    running = Mesh(settings)
    started = time.monotonic()
    try:
        running.start()
        models_dir = digits_models[0].path.parent
        asyncio.run(register_demo(f"127.0.0.1:{settings.registry_port}", models_dir))
        asyncio.run(wait_ready(f"127.0.0.1:{settings.grpc_port}", timeout=60))
        asyncio.run(_wait_all_nodes(redis_server, len(RUNTIMES)))
        print(f"mesh up in {time.monotonic() - started:.1f}s")
        yield RunningMesh(settings, running)
    finally:
        running.stop()
        mp.undo()


async def _wait_all_nodes(redis_url: str, count: int, timeout: float = 30.0) -> None:
    from redis.asyncio import Redis

    from services.common.nodes import NodeDirectory

    redis = Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(await NodeDirectory(redis).live_nodes()) >= count:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"fewer than {count} nodes registered within {timeout}s")
    finally:
        await redis.aclose()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Per test module: a CA, a server certificate for 127.0.0.1/localhost, a client certificate,
    and another CA (tests/pki.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
