"""Triton's explicit model control through the coordinator (tritonclient `unload_model` /
`load_model`, gRPC and REST): an unloaded model is out of service across the mesh and out of the
nodes' memory; loading it puts it back and warms it on every eligible node."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from services.pb.cnei import node_pb2 as npb
from services.pb.cnei import node_pb2_grpc as npb_grpc
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.processes import assert_refused, push_digits_as, run_cnei

MODEL = "digits-ctl"
EDGES = ("edge-a1", "edge-b1")


@pytest.fixture(scope="module")
def ctl_model(mesh, digits_models):
    return push_digits_as(mesh, digits_models, MODEL)


def _infer(client):
    inp = triton.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(np.ones((2, 64), np.float32))
    return client.infer(MODEL, [inp]).as_numpy("probabilities")


def _loaded_on(mesh, node_id: str) -> bool:
    async def status():
        async with grpc.aio.insecure_channel(mesh.runtime(node_id)) as channel:
            return await npb_grpc.NodeControlStub(channel).GetNodeStatus(npb.NodeStatusRequest(), timeout=10)
    return any(m.name == MODEL for m in asyncio.run(status()).models)


def _ready_models(mesh) -> set[str]:
    """RepositoryIndex with `ready` set (tritonclient does not send it)."""
    async def index():
        async with grpc.aio.insecure_channel(mesh.coordinator) as channel:
            return await pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                pb.RepositoryIndexRequest(ready=True), timeout=10)
    return {m.name for m in asyncio.run(index()).models}


def test_unload_takes_a_model_out_of_service_and_load_puts_it_back_warm(mesh, ctl_model):
    client = triton.InferenceServerClient(mesh.coordinator)
    try:
        assert _infer(client).shape == (2, 10)
        client.unload_model(MODEL)
        assert not any(_loaded_on(mesh, n) for n in EDGES + ("cloud-1",))
        for _ in range(3):
            with pytest.raises(InferenceServerException, match="is unloaded") as unloaded:
                _infer(client)
            assert unloaded.value.status() == "StatusCode.UNAVAILABLE"
        assert not client.is_model_ready(MODEL)
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert (index[MODEL].state, index[MODEL].reason) == ("UNAVAILABLE", "unloaded")
        assert index["digits"].state == "READY"
        assert MODEL not in _ready_models(mesh)
        status = run_cnei("status", "--url", mesh.rest, "--redis", mesh.settings.redis_url, "--registry", mesh.registry,
                          timeout=60)
        states = {line.split()[0]: line.split()[-1] for line in status.stdout.splitlines()
                  if line.startswith(("digits ", f"{MODEL} ")) and line.split()[-1] in ("serving", "unloaded")}
        assert states == {"digits": "serving", MODEL: "unloaded"}, status.stdout + status.stderr

        client.load_model(MODEL)
        assert all(_loaded_on(mesh, n) for n in EDGES)  # warm before the first request
        assert client.is_model_ready(MODEL)
        assert _infer(client).shape == (2, 10)
    finally:
        client.load_model(MODEL)
        client.close()


def test_model_control_over_rest(mesh, ctl_model):
    client = http.InferenceServerClient(mesh.rest.removeprefix("http://"))
    try:
        client.unload_model(MODEL)
        assert not client.is_model_ready(MODEL)
        assert {"name": MODEL, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in \
            client.get_model_repository_index()
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
    finally:
        client.load_model(MODEL)
        client.close()


def test_model_control_refuses_what_it_cannot_do(mesh, ctl_model):
    client = triton.InferenceServerClient(mesh.coordinator)
    try:
        for call in (client.load_model, client.unload_model):
            assert_refused(call, "no-such-model", status="NOT_FOUND", match="model 'no-such-model' not found")
    finally:
        client.close()


def test_an_edge_runtime_loads_and_drops_a_model_from_memory_on_request(mesh, ctl_model):
    """Called directly, a runtime warms or evicts (it still pulls a model a request needs)."""
    client = triton.InferenceServerClient(mesh.runtime("edge-b1"))
    try:
        client.load_model(MODEL)
        assert _loaded_on(mesh, "edge-b1")
        client.unload_model(MODEL)
        assert not _loaded_on(mesh, "edge-b1")
        assert _infer(client).shape == (2, 10)  # pulled again on demand
        assert _loaded_on(mesh, "edge-b1")
    finally:
        client.close()


def test_the_command_line_loads_and_unloads(mesh, ctl_model):
    try:
        out = run_cnei("models", "unload", MODEL, "--url", mesh.coordinator)
        assert out.returncode == 0 and "unloaded" in out.stdout, out.stderr
        refused = run_cnei("infer", MODEL, "--url", mesh.coordinator)
        assert refused.returncode == 2 and "UNAVAILABLE" in refused.stderr and "is unloaded" in refused.stderr
        out = run_cnei("models", "load", MODEL, "--url", mesh.coordinator)
        assert out.returncode == 0 and "loaded" in out.stdout, out.stderr
        assert run_cnei("infer", MODEL, "--url", mesh.coordinator).returncode == 0
        missing = run_cnei("models", "unload", "no-such-model", "--url", mesh.coordinator)
        assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
    finally:
        run_cnei("models", "load", MODEL, "--url", mesh.coordinator)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
@pytest.mark.parametrize(("override", "named"), [
    ({"config": '{"max_batch_size": 8}'}, "'config'"),
    ({"files": {"file:1/model.onnx": b"\0"}}, "'file:1/model.onnx'"),
])
def test_a_load_overriding_the_configuration_or_files_is_refused_not_ignored(mesh, ctl_model, protocol, override,
                                                                              named):
    lib, address = (triton, mesh.coordinator) if protocol == "grpc" else (http, mesh.rest.removeprefix("http://"))
    client = lib.InferenceServerClient(address)
    try:
        with pytest.raises(InferenceServerException, match=f"load parameter {named} is not offered") as refused:
            client.load_model(MODEL, **override)
        assert refused.value.status() == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")
        assert client.is_model_ready(MODEL)
    finally:
        client.close()
