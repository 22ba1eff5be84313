"""What a runtime process refreshes when the registry announces a version or a deployment (and
on reconnect): the versions the model's deployment serves, not whatever version is newest."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.common.deployment import DeploymentSpec, RolloutSpec
from services.common.registry_client import RegistryClient
from services.pb.cnei import node_pb2 as npb
from services.pb.cnei import node_pb2_grpc as npb_grpc
from tests.retrained import write_versions


def start_runtime(registry: str, nats_server: str, redis_server: str, folder, **env_extra: str):
    """A runtime process of `registry` (events from `nats_server`; its node record in a Redis
    database no mesh reads): (process, its OIP address)."""
    port = infra.free_port()
    env = {**os.environ, "CNEI_RUNTIME_NODE_ID": f"resync-{uuid.uuid4().hex[:6]}", "CNEI_RUNTIME_PORT": str(port),
           "CNEI_RUNTIME_METRICS_PORT": "0", "CNEI_RUNTIME_FAST_LANE": "false",
           "CNEI_RUNTIME_REGISTRY_TARGET": registry, "CNEI_RUNTIME_NATS_URL": nats_server,
           "CNEI_RUNTIME_REDIS_URL": redis_server.rsplit("/", 1)[0] + "/9", "CNEI_RUNTIME_CACHE_DIR": str(folder),
           "CNEI_RUNTIME_INTRA_OP_THREADS": "1", "CNEI_RUNTIME_MEASURE_ON_LOAD": "false",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "", **env_extra}
    with (folder.parent / f"{folder.name}.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.edge_runtime"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        infra.wait_for_port("127.0.0.1", port, proc=proc, timeout=30)
    except BaseException:
        infra.stop(proc)
        raise
    return proc, f"127.0.0.1:{port}"


def loaded(address: str) -> set[str]:
    """The variant keys the runtime at `address` holds in memory."""
    async def status():
        async with grpc.aio.insecure_channel(address) as channel:
            return await npb_grpc.NodeControlStub(channel).GetNodeStatus(npb.NodeStatusRequest(), timeout=10)
    return {f"{m.name}:{m.version}:{m.precision}" for m in asyncio.run(status()).models}


def infer(address: str, model: str, version: str = "") -> str:
    """One digits row through the runtime: the version that answered."""
    client = triton.InferenceServerClient(address)
    try:
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
        return client.infer(model, [tensor], model_version=version, client_timeout=30).get_response().model_version
    finally:
        client.close()


def call_registry(registry: str, method: str, *args):
    async def go():
        client = RegistryClient(registry, timeout=30)
        try:
            return await getattr(client, method)(*args)
        finally:
            await client.close()
    return asyncio.run(go())


@pytest.fixture
def two_files(tmp_path):
    return write_versions(tmp_path)


def test_a_version_the_deployment_does_not_serve_is_neither_pulled_nor_loaded_and_its_promotion_loads_it(
        registry, nats_server, redis_server, tmp_path, two_files):
    uid = uuid.uuid4().hex[:8]
    pinned, newest = f"pinned-{uid}", f"newest-{uid}"
    v1_file, v2_file = two_files
    size = max(v1_file.stat().st_size, v2_file.stat().st_size)
    for model in (pinned, newest):
        call_registry(registry, "push_file", v1_file, model, "1", "FP32")
    call_registry(registry, "put_deployment", DeploymentSpec(model=pinned, rollout=RolloutSpec(stable="1")))
    cache = tmp_path / "cache"
    proc, address = start_runtime(registry, nats_server, redis_server, cache,
                                  CNEI_RUNTIME_CACHE_MAX_BYTES=str(size * 7 // 2))  # three fit in memory
    try:
        assert infer(address, pinned, "1") == "1" and infer(address, newest) == "1"
        call_registry(registry, "push_file", v2_file, pinned, "2", "FP32")  # not released: stable stays 1
        call_registry(registry, "push_file", v2_file, newest, "2", "FP32")  # no deployment: the latest serves
        # a subject's events are handled in order: once newest v2 is loaded, pinned v2's event was handled
        infra.wait_until(lambda: f"{newest}:2:FP32" in loaded(address), 20, "the newest version loaded")
        held = loaded(address)  # (a fourth model would evict the least recently used: pinned v1)
        assert f"{pinned}:1:FP32" in held and f"{pinned}:2:FP32" not in held, held
        assert [p.name for p in cache.glob(f"{pinned}+2+*.json")] == []  # never pulled either

        call_registry(registry, "put_deployment", DeploymentSpec(model=pinned, rollout=RolloutSpec(stable="2")))
        infra.wait_until(lambda: f"{pinned}:2:FP32" in loaded(address), 20, "the promoted version loaded")
    finally:
        infra.stop(proc)
