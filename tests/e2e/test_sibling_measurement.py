"""A runtime measures the precision variants of a version it did not load: a registry holding the
digits model in FP32, FP16 and INT8 and an edge runtime that preloads FP32 alone, as real processes
(against the session's NATS and Redis)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest

from services.cli import infra
from services.common.registry_client import RegistryClient
from services.pb.cnei import node_pb2 as npb
from services.pb.cnei import node_pb2_grpc as npb_grpc
from tests.edge_runtime.processes import push_all_precisions, spawn_logged

NODE_CLASS = "sibling-probe"
SIBLINGS_MEASURED_WITHIN_S = 30.0  # the runtime starts, preloads FP32, then measures FP16 and INT8


def _start(module: str, env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    return spawn_logged(module, {**os.environ, **env}, port, log)


@pytest.fixture
def registry(nats_server, tmp_path):
    port = infra.free_port()
    proc = _start("services.registry", {
        "CNEI_REGISTRY_HOST": "127.0.0.1", "CNEI_REGISTRY_PORT": str(port), "CNEI_REGISTRY_METRICS_PORT": "0",
        "CNEI_REGISTRY_DATA_DIR": str(tmp_path / "registry"), "CNEI_REGISTRY_NATS_URL": nats_server,
        "OTEL_EXPORTER_OTLP_ENDPOINT": ""}, port, tmp_path / "registry.log")
    yield f"127.0.0.1:{port}"
    infra.stop(proc)


def start_runtime(registry: str, nats_server: str, redis_server: str, tmp_path: Path, model: str,
                  **extra: str) -> tuple[subprocess.Popen, str]:
    """An edge runtime of class NODE_CLASS preloading the model's default variant (FP32)."""
    port = infra.free_port()
    proc = _start("services.edge_runtime", {
        "CNEI_RUNTIME_NODE_ID": f"sib-{uuid.uuid4().hex[:6]}", "CNEI_RUNTIME_PORT": str(port),
        "CNEI_RUNTIME_METRICS_PORT": "0", "CNEI_RUNTIME_FAST_LANE": "false",
        "CNEI_RUNTIME_NODE_CLASS": NODE_CLASS, "CNEI_RUNTIME_INTRA_OP_THREADS": "1",
        "CNEI_RUNTIME_REGISTRY_TARGET": registry, "CNEI_RUNTIME_REDIS_URL": redis_server,
        "CNEI_RUNTIME_NATS_URL": nats_server, "CNEI_RUNTIME_CACHE_DIR": str(tmp_path / "cache"),
        "CNEI_RUNTIME_PRELOAD": model, "OTEL_EXPORTER_OTLP_ENDPOINT": "", **extra}, port, tmp_path / "runtime.log")
    return proc, f"127.0.0.1:{port}"


async def measured(registry: str, name: str) -> dict[str, tuple[str, str]]:
    """precision -> (latency_ms, memory_bytes) the registry holds for NODE_CLASS."""
    client = RegistryClient(registry, timeout=10)
    try:
        variants = await client.list(name)
    finally:
        await client.close()
    return {v.precision: (v.metadata[f"latency_ms.{NODE_CLASS}"], v.metadata[f"memory_bytes.{NODE_CLASS}"])
            for v in variants if f"latency_ms.{NODE_CLASS}" in v.metadata}


async def wait_measured(registry: str, name: str, precisions: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = await measured(registry, name)
        if precisions <= set(found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def loaded(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        status = await npb_grpc.NodeControlStub(channel).GetNodeStatus(npb.NodeStatusRequest(), timeout=10)
    return sorted(f"{m.name}:{m.version}:{m.precision}" for m in status.models)


async def test_a_runtime_that_loads_fp32_measures_fp16_and_int8_on_its_class_without_loading_them(
        registry, nats_server, redis_server, digits_models, tmp_path):
    name = await push_all_precisions(registry, digits_models)
    proc, address = start_runtime(registry, nats_server, redis_server, tmp_path, name)
    try:
        found = await wait_measured(registry, name, {"FP32", "FP16", "INT8"}, SIBLINGS_MEASURED_WITHIN_S)
        assert set(found) == {"FP32", "FP16", "INT8"}, (found, (tmp_path / "runtime.log").read_text()[-3000:])
        for precision, (latency_ms, memory_bytes) in found.items():
            assert float(latency_ms) > 0 and int(memory_bytes) > 0, (precision, latency_ms, memory_bytes)
        assert await loaded(address) == [f"{name}:1:FP32"]  # measured, never served from memory
        assert not any(p.name.endswith(".tmp") for p in (tmp_path / "cache").iterdir())
    finally:
        infra.stop(proc)


async def test_a_runtime_told_not_to_measure_siblings_measures_only_what_it_loads(
        registry, nats_server, redis_server, digits_models, tmp_path):
    name = await push_all_precisions(registry, digits_models)
    proc, address = start_runtime(registry, nats_server, redis_server, tmp_path, name,
                                  CNEI_RUNTIME_MEASURE_SIBLINGS="false")
    try:
        assert set(await wait_measured(registry, name, {"FP32"}, SIBLINGS_MEASURED_WITHIN_S)) == {"FP32"}
        await asyncio.sleep(2.0)  # what a sibling measurement would take, and more
        assert set(await measured(registry, name)) == {"FP32"}
        assert await loaded(address) == [f"{name}:1:FP32"]
    finally:
        infra.stop(proc)
