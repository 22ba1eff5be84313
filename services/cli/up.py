"""`cnei up`: start NATS/Redis when absent, then the whole mesh, register the demo model, wait."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.cli import infra
from services.cli.up_keys import (NODE_CLIENTS, REGISTRY_CLIENTS, check_client_certificates, client_env,
                                  coordinator_credentials, registry_credentials, registry_headers)
from services.common import settings as cfg
from services.common.errors import AlreadyExists
from services.common.registry_client import RegistryClient

log = logging.getLogger("cnei.up")
PREFIX = "CNEI_"


@dataclass(frozen=True)
class MeshSettings:
    data_dir: str = cfg.field(".cnei", "where the mesh keeps registry data, caches and logs")
    nats_url: str = cfg.field("nats://127.0.0.1:4222", "NATS server (started here if none answers)")
    redis_url: str = cfg.field("redis://127.0.0.1:6379/0", "Redis server (started here if none answers)")
    registry_port: int = cfg.field(50051, "registry gRPC port")
    grpc_port: int = cfg.field(8001, "coordinator OIP gRPC port")
    http_port: int = cfg.field(8000, "coordinator REST port")
    metrics_port: int = cfg.field(8002, "coordinator metrics port")
    coordinator_workers: int = cfg.field(1, "coordinator processes sharing its gRPC port (0: one per CPU)")
    coordinator_front_door: str = cfg.field("auto", "the coordinator's compiled gRPC front door: auto|on|off")
    runtime_base_port: int = cfg.field(50061, "first runtime gRPC port (cloud, then edges)")
    runtime_http_base_port: int = cfg.field(50081, "first runtime OIP REST v2 port (cloud, then edges)")
    runtime_metrics_base_port: int = cfg.field(9111, "first runtime metrics port")
    registry_metrics_port: int = cfg.field(9101, "registry metrics port")
    trainer_port: int = cfg.field(50071, "federated trainer gRPC port")
    trainer_metrics_port: int = cfg.field(9121, "federated trainer metrics port")
    demo: bool = cfg.field(True, "build and register the digits demo model")


# The cloud tier pays more per CPU second and for egress (per MB), as in the cost model.
CLOUD_PRICES = {"CNEI_RUNTIME_COST_PER_CPU_SECOND": "0.00005", "CNEI_RUNTIME_COST_PER_NETWORK_MB": "0.00009",
                "CNEI_RUNTIME_WATTS_PER_CORE": "25"}
RUNTIMES = [("cloud-1", "cloud", "cloud"), ("edge-a1", "edge", "site-a"), ("edge-b1", "edge", "site-b")]
EDGES = [node_id for node_id, tier, _ in RUNTIMES if tier == "edge"]


def shard_env(node_id: str) -> dict[str, str]:
    """Each edge runtime holds its own shard of the federated training data."""
    if node_id not in EDGES:
        return {}
    return {"CNEI_RUNTIME_SHARD_INDEX": str(EDGES.index(node_id)), "CNEI_RUNTIME_SHARD_COUNT": str(len(EDGES))}


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    ready_port: int


class Mesh:
    """The processes one `cnei up` owns; stops them in reverse start order."""

    def __init__(self, settings: MeshSettings):
        self.s = settings
        self.root = Path(settings.data_dir).resolve()
        self.logs = self.root / "logs"
        self.children: list[Child] = []
        self.stopping = False  # set by SIGINT/SIGTERM: waits give up (infra.Interrupted)
        # what each service it starts is handed: the keys and CA of what that service calls
        self.handed = {module: client_env(module) for module in {*REGISTRY_CLIENTS, *NODE_CLIENTS}}

    def _spawn(self, name: str, module: str, env: dict[str, str], port: int) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")
        env = {**env, **self.handed.get(module, {})}
        proc = subprocess.Popen([sys.executable, "-m", module], env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT, **infra.tied_to_this_process())
        self.children.append(Child(name, proc, port))

    def _infra(self) -> None:
        nats_host, nats_port = infra.host_port(self.s.nats_url, 4222)
        if not infra.answers(nats_host, nats_port):
            proc = infra.start_nats(nats_port, self.root / "nats", self.logs / "nats.log", nats_host,
                                    tied=True, stopping=self.is_stopping)
            self.children.append(Child("nats", proc, nats_port))
            print(f"started nats-server (JetStream) on {nats_host}:{nats_port}")
        redis_host, redis_port = infra.host_port(self.s.redis_url, 6379)
        if not infra.answers(redis_host, redis_port):
            proc = infra.start_redis(redis_port, self.root / "redis", self.logs / "redis.log", redis_host,
                                     tied=True, stopping=self.is_stopping)
            self.children.append(Child("redis", proc, redis_port))
            print(f"started redis-server on {redis_host}:{redis_port}")

    def check_client_certificates(self) -> None:
        """ValueError naming what to set when a server this mesh starts requires client
        certificates that are not handed to every service calling it (up_keys)."""
        check_client_certificates(self.handed)

    def start(self) -> None:
        self.check_client_certificates()
        self.check_ports_free()
        self.logs.mkdir(parents=True, exist_ok=True)
        self._infra()
        common = {"CNEI_REGISTRY_NATS_URL": self.s.nats_url}
        registry = f"127.0.0.1:{self.s.registry_port}"
        self._spawn("registry", "services.registry", {
            **common, "CNEI_REGISTRY_PORT": str(self.s.registry_port),
            "CNEI_REGISTRY_METRICS_PORT": str(self.s.registry_metrics_port),
            "CNEI_REGISTRY_DATA_DIR": str(self.root / "registry"),
        }, self.s.registry_port)
        for i, (node_id, tier, region) in enumerate(RUNTIMES):
            port = self.s.runtime_base_port + i
            self._spawn(node_id, "services.edge_runtime", {
                "CNEI_RUNTIME_NODE_ID": node_id, "CNEI_RUNTIME_TIER": tier,
                "CNEI_RUNTIME_REGION": region, "CNEI_RUNTIME_PORT": str(port),
                "CNEI_RUNTIME_HTTP_PORT": str(self.s.runtime_http_base_port + i),
                "CNEI_RUNTIME_METRICS_PORT": str(self.s.runtime_metrics_base_port + i),
                "CNEI_RUNTIME_REGISTRY_TARGET": registry, "CNEI_RUNTIME_REDIS_URL": self.s.redis_url,
                "CNEI_RUNTIME_NATS_URL": self.s.nats_url,
                "CNEI_RUNTIME_CACHE_DIR": str(self.root / "cache" / node_id),
                "CNEI_RUNTIME_PRELOAD": "digits" if self.s.demo else "",
                **(CLOUD_PRICES if tier == "cloud" else {}), **shard_env(node_id),
            }, port)
        self._spawn("coordinator", "services.coordinator", {
            "CNEI_COORDINATOR_GRPC_PORT": str(self.s.grpc_port),
            "CNEI_COORDINATOR_HTTP_PORT": str(self.s.http_port),
            "CNEI_COORDINATOR_METRICS_PORT": str(self.s.metrics_port),
            "CNEI_COORDINATOR_WORKERS": str(self.s.coordinator_workers),
            "CNEI_COORDINATOR_FRONT_DOOR": self.s.coordinator_front_door,
            "CNEI_COORDINATOR_REGISTRY_TARGET": registry,
            "CNEI_COORDINATOR_REDIS_URL": self.s.redis_url,
            "CNEI_COORDINATOR_NATS_URL": self.s.nats_url,
        }, self.s.grpc_port)
        self._spawn_trainer(registry)
        for child in self.children:
            infra.wait_for_port("127.0.0.1", child.ready_port, timeout=60, proc=child.proc, stopping=self.is_stopping)

    def is_stopping(self) -> bool:
        return self.stopping

    def run_until_stopped(self, coro):
        """asyncio.run(coro), given up (infra.Interrupted) as soon as a stop signal arrives."""
        async def watched():
            task = asyncio.ensure_future(coro)
            while not task.done():
                if self.stopping:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise infra.Interrupted("stopped during startup")
                await asyncio.wait({task}, timeout=0.1)
            return task.result()
        return asyncio.run(watched())

    def _spawn_trainer(self, registry: str) -> None:
        self._spawn("trainer", "services.trainer", {
            "CNEI_TRAINER_PORT": str(self.s.trainer_port),
            "CNEI_TRAINER_METRICS_PORT": str(self.s.trainer_metrics_port),
            "CNEI_TRAINER_REGISTRY_TARGET": registry, "CNEI_TRAINER_REDIS_URL": self.s.redis_url,
            "CNEI_TRAINER_NATS_URL": self.s.nats_url, "CNEI_TRAINER_DATA_DIR": str(self.root / "trainer"),
        }, self.s.trainer_port)

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def check_ports_free(self) -> None:
        """Refuse to start over another mesh: every service port must be free."""
        ports = [self.s.registry_port, self.s.grpc_port, self.s.http_port, self.s.metrics_port,
                 self.s.registry_metrics_port, self.s.trainer_port, self.s.trainer_metrics_port]
        ports += [self.s.runtime_base_port + i for i in range(len(RUNTIMES))]
        ports += [base + i for base in (self.s.runtime_http_base_port, self.s.runtime_metrics_base_port)
                  for i in range(len(RUNTIMES))]
        busy = [p for p in ports if infra.answers("127.0.0.1", p)]
        if busy:
            raise RuntimeError(f"ports {busy} are already in use (is another mesh running?)")

    def stop(self) -> None:
        """SIGTERM every CNEI service at once, wait for them, then stop NATS and Redis."""
        services = [c for c in self.children if c.name not in ("nats", "redis")]
        for child in services:
            if child.proc.poll() is None:
                child.proc.terminate()
        for child in services:
            infra.stop(child.proc)
        for child in reversed([c for c in self.children if c not in services]):
            infra.stop(child.proc)


async def register_demo(registry_target: str, models_dir: Path) -> list[str]:
    """Build the digits variants (once) and push each; existing versions are kept."""
    from services.common.restricted import headers
    from services.models import digits

    built = await asyncio.to_thread(digits.build, models_dir)
    client = RegistryClient(registry_target, headers=headers(registry_headers()), credentials=registry_credentials())
    lines = []
    try:
        registered = {v.precision for v in await client.list(digits.NAME) if v.version == digits.VERSION}
        for variant in built:
            if variant.precision in registered:  # a push of the same artifact would return it as new
                lines.append(f"{digits.NAME} v{digits.VERSION} {variant.precision} already registered")
                continue
            try:
                await client.push_file(variant.path, digits.NAME, digits.VERSION,
                                       variant.precision, variant.metadata)
                lines.append(f"registered {digits.NAME} v{digits.VERSION} {variant.precision} "
                             f"(accuracy {variant.metadata['accuracy']})")
            except AlreadyExists:
                lines.append(f"{digits.NAME} v{digits.VERSION} {variant.precision} already registered")
    finally:
        await client.close()
    return lines


async def wait_ready(target: str, timeout: float = 60.0) -> None:
    """Wait until the coordinator reports ready (a node is live)."""
    from services.common import grpc_util
    from services.common.restricted import own_headers
    from services.pb.inference import grpc_service_pb2 as pb
    from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

    # the coordinator this process configured may restrict its health API: send its headers
    metadata = own_headers(os.environ.get("CNEI_COORDINATOR_RESTRICTED_APIS", ""))
    deadline = time.monotonic() + timeout
    async with grpc_util.channel(target, credentials=coordinator_credentials()) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if (await stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0, metadata=metadata)).ready:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"coordinator at {target} not ready within {timeout}s")


def run_up() -> int:
    settings = cfg.load_at_start(MeshSettings, PREFIX)
    mesh = Mesh(settings)

    def on_signal(signum, frame):
        mesh.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    try:
        mesh.start()
        if settings.demo:
            for line in mesh.run_until_stopped(register_demo(f"127.0.0.1:{settings.registry_port}",
                                                             mesh.root / "models")):
                print(line)
        mesh.run_until_stopped(wait_ready(f"127.0.0.1:{settings.grpc_port}"))
        print(f"CNEI mesh up in {time.monotonic() - started:.1f}s: OIP gRPC 127.0.0.1:{settings.grpc_port}, "
              f"REST http://127.0.0.1:{settings.http_port}, metrics :{settings.metrics_port}, "
              f"runtimes REST http://127.0.0.1:{settings.runtime_http_base_port}-"
              f"{settings.runtime_http_base_port + len(RUNTIMES) - 1}, "
              f"trainer 127.0.0.1:{settings.trainer_port}; "
              f"logs in {mesh.logs}. Ctrl-C stops it.", flush=True)
        while not mesh.stopping:
            dead = mesh.dead_child()
            if dead is not None:
                print(f"{dead.name} exited with {dead.proc.returncode}; stopping the mesh "
                      f"(see {mesh.logs / (dead.name + '.log')})", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except infra.Interrupted:
        print("interrupted: stopping what was started", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - report and stop what was started
        print(f"cnei up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping the mesh...", flush=True)
        mesh.stop()
