"""A runtime process against the module's registry process, and what tests ask of it and of the
registry."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import numpy as np
import onnx
import tritonclient.grpc as triton

from services.cli import infra
from services.common.registry_client import RegistryClient
from services.models.onnx_mlp import mlp_graph
from services.models.wide_mlp import random_weights
from services.pb.cnei import node_pb2 as npb
from services.pb.cnei import node_pb2_grpc as npb_grpc

MLP_LAYERS = (64, 128, 128, 10)  # ~105 kB of FP32 weights; every seed the same size


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
    return spawn_logged("services.edge_runtime", env, port, folder.parent / f"{folder.name}.log"), f"127.0.0.1:{port}"


def spawn_logged(module: str, env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """`python -m module` with exactly `env`, its output appended to `log`, once `port` answers
    (stopped if it never does)."""
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        infra.wait_for_port("127.0.0.1", port, proc=proc, timeout=30)
    except BaseException:
        infra.stop(proc)
        raise
    return proc


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


def write_mlp(folder: Path, seed: int, layers: tuple[int, ...] = MLP_LAYERS) -> Path:
    """An MLP taking digits rows, its weights drawn from `seed` (distinct bytes, one size per `layers`)."""
    path = folder / f"mlp-{len(layers)}-{layers[1]}-{seed}.onnx"
    onnx.save(mlp_graph(*random_weights(layers, seed=seed), name="budget"), path)
    return path


async def push_all_precisions(registry: str, digits_models, prefix: str = "digits-sib") -> str:
    """The digits model pushed in every precision built (FP32, FP16, INT8) as version 1 of a
    fresh name (returned)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    client = RegistryClient(registry, timeout=30)
    try:
        for built in digits_models:
            await client.push_file(built.path, name, "1", built.precision, built.metadata)
    finally:
        await client.close()
    return name
