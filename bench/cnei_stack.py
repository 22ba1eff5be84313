"""The CNEI side of the bench: NATS + Redis on free ports, the Mesh, both models registered."""
from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

from bench import cpu, perf
from services.cli import infra
from services.cli.up import RUNTIMES, Mesh, MeshSettings, wait_ready
from services.common.deployment import DeploymentSpec
from services.common.errors import AlreadyExists
from services.common.registry_client import RegistryClient
from services.coordinator.door_process import BUILT
from services.models.digits import BuiltVariant

EDGE_NODE = "edge-a1"
MODEL_VERSION = "1"  # digits.VERSION and wide_mlp.VERSION
# Both models keep the default deployment (one batch in flight per node). wide_mlp's sessions run
# on both cores (the runtime's automatic intra-op threads), so a second batch in flight only waits
# for them; measured here it neither helped nor hurt beyond the run-to-run noise.
DEPLOYMENTS: list[DeploymentSpec] = []


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def free_ports(count: int) -> list[int]:
    """`count` different free ports (below the ephemeral range; see services/cli/infra.py)."""
    return [infra.free_port() for _ in range(count)]


async def register(registry: str, models: dict[str, list[BuiltVariant]]) -> dict[str, dict[str, dict]]:
    """Push every variant (already registered is fine); {model: {precision: registry metadata}}."""
    client = RegistryClient(registry)
    try:
        for name, variants in models.items():
            for v in variants:
                try:
                    await client.push_file(v.path, name, MODEL_VERSION, v.precision, v.metadata)
                except AlreadyExists:
                    pass
        for spec in DEPLOYMENTS:
            await client.put_deployment(spec)
        return {name: {v.precision: dict(v.metadata) for v in await client.list(name)} for name in models}
    finally:
        await client.close()


async def live_node_ids(redis_url: str) -> list[str]:
    from redis.asyncio import Redis

    from services.common.nodes import NodeDirectory

    redis = Redis.from_url(redis_url)
    try:
        return sorted(n.node_id for n in await NodeDirectory(redis).live_nodes())
    finally:
        await redis.aclose()


def wait_nodes(redis_url: str, expected: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := asyncio.run(live_node_ids(redis_url))) != sorted(expected):
        if time.monotonic() > deadline:
            raise TimeoutError(f"live nodes {seen}, expected {sorted(expected)}")
        time.sleep(0.2)


def _client(target: str, tls: perf.ClientTls | None = None) -> triton.InferenceServerClient:
    if tls is None:
        return triton.InferenceServerClient(target)
    ca, cert, key = tls
    return triton.InferenceServerClient(target, ssl=True, root_certificates=ca, certificate_chain=cert,
                                        private_key=key)


def warm_up(target: str, model: str, precision: str, calls: int = 5, tls: perf.ClientTls | None = None) -> None:
    """A few single-sample requests, so model loading never lands inside a measurement."""
    client = _client(target, tls)
    try:
        x = np.zeros((1, 64), np.float32)
        for _ in range(calls):
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer(model, [inp], parameters={"precision": precision}, client_timeout=120)
    finally:
        client.close()


class CneiStack:
    """NATS, Redis and the mesh; with `runtimes=1` only edge-a1 stays up behind the coordinator."""

    def __init__(self, root: Path, runtimes: int = 1, coordinator_workers: int = 1, front_door: str = "on",
                 node_tls: bool = False):
        """`node_tls`: the runtimes serve mutual TLS (a PKI made under `root`), which the
        coordinator, its door and the bench's own clients of the runtimes use."""
        self.root = root
        self.node_tls: perf.ClientTls | None = None
        if node_tls:
            from tests.pki import make_pki

            (root / "pki").mkdir(parents=True, exist_ok=True)
            pki = make_pki(root / "pki")
            self.node_tls = (pki["ca"], pki["client_cert"], pki["client_key"])
            # `cnei up` (the Mesh) serves the runtimes on it and hands the CA and certificate on
            os.environ.update({"CNEI_RUNTIME_TLS_CERT_FILE": pki["cert"], "CNEI_RUNTIME_TLS_KEY_FILE": pki["key"],
                               "CNEI_RUNTIME_TLS_CLIENT_CA_FILE": pki["ca"], "CNEI_NODE_TLS_CA": pki["ca"],
                               "CNEI_NODE_TLS_CERT": pki["client_cert"], "CNEI_NODE_TLS_KEY": pki["client_key"]})
        self.runtimes = runtimes
        self.infra: list[subprocess.Popen] = []
        self.mesh: Mesh | None = None
        self.registry_metadata: dict[str, dict[str, dict]] = {}
        ports = free_ports(9)
        runtime_base = infra.free_ports(len(RUNTIMES))
        metrics_base = infra.free_ports(len(RUNTIMES))
        self.settings = MeshSettings(
            data_dir=str(root / "mesh"), nats_url=f"nats://127.0.0.1:{ports[0]}",
            redis_url=f"redis://127.0.0.1:{ports[1]}/0", registry_port=ports[2], grpc_port=ports[3],
            http_port=ports[4], metrics_port=ports[5], registry_metrics_port=ports[6],
            coordinator_workers=coordinator_workers, coordinator_front_door=front_door, trainer_port=ports[7], trainer_metrics_port=ports[8],
            runtime_base_port=runtime_base, runtime_metrics_base_port=metrics_base,
        )

    @property
    def coordinator(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    @property
    def edge(self) -> str:
        return self.runtime(EDGE_NODE)

    def runtime(self, node_id: str) -> str:
        index = [r[0] for r in RUNTIMES].index(node_id)
        return f"127.0.0.1:{self.settings.runtime_base_port + index}"

    @property
    def kept_nodes(self) -> list[str]:
        return [r[0] for r in RUNTIMES] if self.runtimes > 1 else [EDGE_NODE]

    def cpu_groups(self) -> dict[str, list[int]]:
        """The serving processes by role: the kept runtimes, the coordinator (its workers too)
        and its front door."""
        by_name = {c.name: c.proc.pid for c in self.mesh.children}
        coordinator = [by_name["coordinator"], *cpu.descendants(by_name["coordinator"])]
        door = [pid for pid in coordinator if Path(_command(pid)).name == BUILT.name]
        return {"runtime": [by_name[n] for n in self.kept_nodes], "door": door,
                "coordinator": [pid for pid in coordinator if pid not in door]}

    def served(self, model: str) -> tuple[int, int]:
        """(rows, executions) of `model` the kept runtimes have run (their Triton statistics;
        rows are requests at batch 1, an execution is one ONNX Runtime call)."""
        rows = executions = 0
        for node_id in self.kept_nodes:
            client = _client(self.runtime(node_id), self.node_tls)
            try:
                stats = client.get_inference_statistics(model, as_json=True)
            finally:
                client.close()
            for s in stats.get("model_stats", []):
                rows += int(s.get("inference_count", 0))
                executions += int(s.get("execution_count", 0))
        return rows, executions

    def warm(self, variants: list[tuple[str, str]]) -> None:
        """Load every (model, precision) on every kept runtime, then go through the coordinator."""
        for node_id in self.kept_nodes:
            for model, precision in variants:
                warm_up(self.runtime(node_id), model, precision, tls=self.node_tls)
        for model, precision in variants:
            warm_up(self.coordinator, model, precision)

    def start(self, models: dict[str, list[BuiltVariant]]) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _, nats_port = infra.host_port(self.settings.nats_url, 4222)
        _, redis_port = infra.host_port(self.settings.redis_url, 6379)
        self.infra.append(infra.start_nats(nats_port, self.root / "nats", logs / "nats.log"))
        self.infra.append(infra.start_redis(redis_port, self.root / "redis", logs / "redis.log"))
        self.mesh = Mesh(self.settings)
        self.mesh.start()
        registry = f"127.0.0.1:{self.settings.registry_port}"
        self.registry_metadata = asyncio.run(register(registry, models))
        asyncio.run(wait_ready(self.coordinator, timeout=60))
        keep = self.kept_nodes
        for child in self.mesh.children:
            if child.name in {r[0] for r in RUNTIMES} - set(keep):
                infra.stop(child.proc)
        wait_nodes(self.settings.redis_url, keep)
        time.sleep(1.0)  # the coordinator re-reads live nodes every 0.2 s

    def stop(self) -> None:
        if self.mesh is not None:
            self.mesh.stop()
        for proc in reversed(self.infra):
            infra.stop(proc)
