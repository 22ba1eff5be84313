"""An emulated heterogeneous cluster on one machine: NATS, Redis, registry, coordinator and edge
runtimes with their own compute slowdown and ingress delay (CNEI_RUNTIME_EMULATED_*)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.cnei_stack import free_ports, wait_nodes
from services.cli import infra
from services.common.deployment import DeploymentSpec
from services.common.errors import AlreadyExists
from services.common.registry_client import RegistryClient
from services.models.digits import BuiltVariant

MODEL_VERSION = "1"


@dataclass(frozen=True)
class NodeSpec:
    """One emulated node: `slowdown`× the host's compute time, `delay_ms` held on every RPC."""

    node_id: str
    tier: str
    region: str
    slowdown: float
    delay_ms: float


# Near nodes are not the fast ones: the closest device (edge-a2) is a 4x slower CPU, the fastest
# edge (edge-a1) sits 3 ms away, the slowest (edge-b2) is also far; the cloud is fast but 40 ms away.
LAYOUT = (
    NodeSpec("edge-a1", "edge", "site-a", slowdown=1.0, delay_ms=3.0),
    NodeSpec("edge-a2", "edge", "site-a", slowdown=4.0, delay_ms=1.0),
    NodeSpec("edge-b1", "edge", "site-b", slowdown=2.0, delay_ms=5.0),
    NodeSpec("edge-b2", "edge", "site-b", slowdown=8.0, delay_ms=10.0),
    NodeSpec("cloud-1", "cloud", "cloud", slowdown=1.0, delay_ms=40.0),
)


def layout_rows(layout: tuple[NodeSpec, ...] = LAYOUT) -> list[dict]:
    return [asdict(n) for n in layout]


class EmulatedCluster:
    """Starts every process on free ports, registers the model, stops all in reverse order.

    The coordinator reaches runtimes over OIP gRPC, where the delay interceptor sits; the internal
    fast lane (CNEI_*_FAST_LANE) applies the same ingress delay."""

    def __init__(self, root: Path, layout: tuple[NodeSpec, ...] = LAYOUT, fast_lane: bool = True):
        self.root = root
        self.layout = layout
        self.fast_lane = fast_lane
        self.procs: list[tuple[str, subprocess.Popen]] = []
        p = free_ports(5 + len(layout))  # no metrics ports: the bench reads ModelStatistics instead
        self.nats_url, self.redis_url = f"nats://127.0.0.1:{p[0]}", f"redis://127.0.0.1:{p[1]}/0"
        self.registry_port, self.grpc_port, self.http_port = p[2:5]
        self.node_ports = {n.node_id: p[5 + i] for i, n in enumerate(layout)}

    @property
    def registry(self) -> str:
        return f"127.0.0.1:{self.registry_port}"

    @property
    def coordinator(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/api/status"

    def node_address(self, node_id: str) -> str:
        return f"127.0.0.1:{self.node_ports[node_id]}"

    def _spawn(self, name: str, module: str, env: dict[str, str], port: int) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("CNEI_", "OTEL_"))}
        proc = subprocess.Popen([sys.executable, "-m", module], env={**clean, **env},
                                stdout=open(logs / f"{name}.log", "ab"), stderr=subprocess.STDOUT)
        self.procs.append((name, proc))
        infra.wait_for_port("127.0.0.1", port, timeout=60, proc=proc)

    def _runtime_env(self, node: NodeSpec, model: str) -> dict[str, str]:
        port = self.node_ports[node.node_id]
        return {
            "CNEI_RUNTIME_NODE_ID": node.node_id, "CNEI_RUNTIME_TIER": node.tier,
            "CNEI_RUNTIME_REGION": node.region, "CNEI_RUNTIME_PORT": str(port),
            "CNEI_RUNTIME_METRICS_PORT": "0", "CNEI_RUNTIME_REGISTRY_TARGET": self.registry,
            "CNEI_RUNTIME_REDIS_URL": self.redis_url, "CNEI_RUNTIME_NATS_URL": self.nats_url,
            "CNEI_RUNTIME_CACHE_DIR": str(self.root / "cache" / node.node_id),
            "CNEI_RUNTIME_NODE_CLASS": node.node_id, "CNEI_RUNTIME_USE_CUDA": "false",
            "CNEI_RUNTIME_EMULATED_SLOWDOWN": str(node.slowdown),
            "CNEI_RUNTIME_EMULATED_DELAY_MS": str(node.delay_ms),
            "CNEI_RUNTIME_PRELOAD": f"{model}:{MODEL_VERSION}:FP32",
            "CNEI_RUNTIME_FAST_LANE": str(self.fast_lane).lower(),
            # One core per emulated node: five runtimes share this machine's cores, and each would
            # otherwise take all of them for its sessions (intra_op_threads 0 picks per model).
            "CNEI_RUNTIME_INTRA_OP_THREADS": "1",
        }

    def start(self, model: str, variants: list[BuiltVariant]) -> None:
        """Infra and registry, the model registered (FP32), then runtimes (preloading it) and the
        coordinator; returns when every node heartbeats."""
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name, url, start in (("nats", self.nats_url, infra.start_nats),
                                 ("redis", self.redis_url, infra.start_redis)):
            port = infra.host_port(url, 0)[1]
            self.procs.append((name, start(port, self.root / name, logs / f"{name}.log")))
        self._spawn("registry", "services.registry", {
            "CNEI_REGISTRY_PORT": str(self.registry_port), "CNEI_REGISTRY_METRICS_PORT": "0",
            "CNEI_REGISTRY_DATA_DIR": str(self.root / "registry"), "CNEI_REGISTRY_NATS_URL": self.nats_url,
        }, self.registry_port)
        asyncio.run(register_fp32(self.registry, model, variants))
        for node in self.layout:
            self._spawn(node.node_id, "services.edge_runtime", self._runtime_env(node, model),
                        self.node_ports[node.node_id])
        self._spawn("coordinator", "services.coordinator", {
            "CNEI_COORDINATOR_GRPC_PORT": str(self.grpc_port), "CNEI_COORDINATOR_HTTP_PORT": str(self.http_port),
            "CNEI_COORDINATOR_METRICS_PORT": "0",
            "CNEI_COORDINATOR_REGISTRY_TARGET": self.registry, "CNEI_COORDINATOR_REDIS_URL": self.redis_url,
            "CNEI_COORDINATOR_NATS_URL": self.nats_url,
            "CNEI_COORDINATOR_FAST_LANE": str(self.fast_lane).lower(),
        }, self.grpc_port)
        wait_nodes(self.redis_url, [n.node_id for n in self.layout], timeout=60)

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs if proc.poll() is not None]

    def stop(self) -> None:
        services = [p for name, p in self.procs if name not in ("nats", "redis")]
        for proc in services:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            infra.stop(proc)
        self.procs = []


async def register_fp32(registry: str, model: str, variants: list[BuiltVariant]) -> None:
    client = RegistryClient(registry)
    try:
        for v in variants:
            if v.precision == "FP32":
                try:
                    await client.push_file(v.path, model, MODEL_VERSION, v.precision, v.metadata)
                except AlreadyExists:
                    pass
    finally:
        await client.close()


async def put_deployment(registry: str, spec: DeploymentSpec) -> None:
    """Store a model's deployment in the registry (the coordinator picks it up on the event)."""
    client = RegistryClient(registry)
    try:
        await client.put_deployment(spec)
    finally:
        await client.close()
