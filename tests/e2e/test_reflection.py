"""gRPC server reflection on the real services, read by grpcio-reflection's client (the protocol
grpcurl speaks): each lists the services it registers (the front door's port not the door's
control service, which it refuses, nor describes it), ModelInfer's request type resolves at every
OIP port (the coordinator with and without its compiled front door, a runtime), the README's
grpcurl calls answer through the coordinator, and CNEI_<SERVICE>_GRPC_REFLECTION=false turns it
off, through the door too."""
from __future__ import annotations

import os
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest, ServerReflectionResponse

from services.cli import infra
from services.coordinator.door_process import BUILT
from tests import reflection
from tests.e2e.processes import server_ready, spawn, start_coordinator, start_door, start_runtime

README = Path(__file__).resolve().parents[2] / "README.md"
HEALTH, REFLECTION = "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"
OIP, DOOR = "inference.GRPCInferenceService", "cnei.frontdoor.v1.FrontDoorControl"
MODEL_INFER = f"{OIP}.ModelInfer"
needs_door = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")
SERVERS = {  # what each server registers besides health and reflection
    "coordinator": [OIP],
    "coordinator behind its door": [OIP],  # not the door's control service, which its port refuses
    "runtime": [OIP, "cnei.node.v1.NodeControl"],
    "registry": ["cnei.registry.v1.ModelRegistry"],
    "trainer": ["cnei.trainer.v1.Trainer"],
}


def _kinds(*names: str) -> list:
    return [pytest.param(k, marks=needs_door) if "door" in k else k for k in names]


KINDS = _kinds(*SERVERS)
OIP_KINDS = _kinds("coordinator", "coordinator behind its door", "runtime")
COORDINATORS = _kinds("coordinator", "coordinator behind its door")


@pytest.fixture(scope="module")
def doorless(mesh):
    """A coordinator serving its public gRPC port itself."""
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="off")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        yield address
    finally:
        infra.stop(proc)


@pytest.fixture(scope="module")
def door(mesh):
    """A coordinator behind its compiled front door, which owns the public port."""
    proc, address, _ = start_door(mesh)
    try:
        yield address
    finally:
        infra.stop(proc)


def _address(kind: str, request, mesh) -> str:
    if kind == "coordinator":
        return request.getfixturevalue("doorless")
    if kind == "coordinator behind its door":
        return request.getfixturevalue("door")
    return {"runtime": mesh.runtime("edge-a1"), "registry": mesh.registry, "trainer": mesh.trainer}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_each_server_lists_the_services_it_registers_with_health_and_reflection(kind, request, mesh):
    assert reflection.listed(_address(kind, request, mesh)) == sorted(SERVERS[kind] + [HEALTH, REFLECTION])


@pytest.mark.parametrize("kind", KINDS)
def test_each_server_describes_every_service_it_lists(kind, request, mesh):
    address = _address(kind, request, mesh)
    for name in reflection.listed(address):
        service = reflection.describe(address, name)
        assert service.full_name == name and service.methods


@needs_door
def test_the_door_s_port_describes_nothing_of_its_control_service(door):
    for symbol in (DOOR, f"{DOOR}.Report", "cnei.frontdoor.v1.FrontDoorReport"):
        with pytest.raises(KeyError):
            reflection.describe(door, symbol)


@pytest.mark.parametrize("kind", KINDS)
def test_reflection_v1_is_unimplemented_at_once_so_grpcurl_falls_back_to_v1alpha(kind, request, mesh):
    ask = ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(_address(kind, request, mesh)) as channel:
        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                   request_serializer=ServerReflectionRequest.SerializeToString,
                                   response_deserializer=ServerReflectionResponse.FromString)
        with pytest.raises(grpc.RpcError) as refused:
            list(v1(iter([ask]), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("kind", OIP_KINDS)
def test_model_infer_s_input_type_resolves_at_every_oip_port(kind, request, mesh):
    infer = reflection.describe(_address(kind, request, mesh), MODEL_INFER)
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert infer.output_type.full_name == "inference.ModelInferResponse"
    tensor = infer.input_type.fields_by_name["inputs"].message_type
    assert {"name", "datatype", "shape", "contents"} <= set(tensor.fields_by_name)


def _readme_grpcurl(method: str) -> str:
    """The JSON body (`-d '...'`, '{}' without one) of the README's grpcurl call of `method` on
    the coordinator's port."""
    calls = re.findall(r"^grpcurl -plaintext (.*?)127\.0\.0\.1:8001 (\S+)", README.read_text().replace("\\\n  ", ""),
                       re.M)
    body = next(flags for flags, called in calls if called == method)
    found = re.fullmatch(r"-d '(.*)' ", body)
    return found.group(1) if found else "{}"


@pytest.mark.parametrize("kind", COORDINATORS)
def test_the_readme_s_describe_examples_resolve_at_the_coordinator(kind, request, mesh):
    symbols = re.findall(r"^grpcurl -plaintext 127\.0\.0\.1:8001 describe (\S+)", README.read_text(), re.M)
    assert symbols
    address = _address(kind, request, mesh)
    assert [reflection.describe(address, symbol).full_name for symbol in symbols] == symbols


@pytest.mark.parametrize("kind", COORDINATORS)
def test_the_readme_s_server_live_call_answers_live(kind, request, mesh):
    body = _readme_grpcurl(f"{OIP}/ServerLive")
    assert reflection.call_json(_address(kind, request, mesh), f"{OIP}.ServerLive", body) == {"live": True}


def _probabilities(reply: dict) -> np.ndarray:
    """The `probabilities` output of a ModelInfer reply in protobuf's JSON mapping, whose request
    sent `contents`: its values come back in `contents` too."""
    tensor = next(t for t in reply["outputs"] if t["name"] == "probabilities")
    assert tensor["datatype"] == "FP32" and tensor["shape"] == ["1", "10"]
    assert "rawOutputContents" not in reply
    return np.array(tensor["contents"]["fp32Contents"], np.float32)


@pytest.mark.parametrize("kind", COORDINATORS)
def test_the_readme_s_model_infer_json_call_classifies_the_first_digit(kind, request, mesh):
    reply = reflection.call_json(_address(kind, request, mesh), MODEL_INFER, _readme_grpcurl(f"{OIP}/ModelInfer"))
    assert reply["modelName"] == "digits"
    assert int(_probabilities(reply).argmax()) == 0  # load_digits' first image is a 0


def _registry(mesh, tmp_path, **env: str):
    port = infra.free_port()
    proc = spawn("services.registry", {**os.environ, "CNEI_REGISTRY_PORT": str(port),
                                       "CNEI_REGISTRY_METRICS_PORT": "0", "CNEI_REGISTRY_DATA_DIR": str(tmp_path),
                                       "CNEI_REGISTRY_NATS_URL": mesh.settings.nats_url, **env}, port)
    return proc, f"127.0.0.1:{port}"


def _trainer(mesh, tmp_path, **env: str):
    port = infra.free_port()
    proc = spawn("services.trainer", {**os.environ, "CNEI_TRAINER_PORT": str(port), "CNEI_TRAINER_METRICS_PORT": "0",
                                      "CNEI_TRAINER_REGISTRY_TARGET": mesh.registry,
                                      "CNEI_TRAINER_REDIS_URL": mesh.settings.redis_url,
                                      "CNEI_TRAINER_NATS_URL": mesh.settings.nats_url,
                                      "CNEI_TRAINER_DATA_DIR": str(tmp_path), **env}, port)
    return proc, f"127.0.0.1:{port}"


def _runtime(mesh, tmp_path, **env: str):
    proc, port = start_runtime(mesh, "edge-x1", "site-x", tmp_path, CNEI_RUNTIME_PRELOAD="", **env)
    return proc, f"127.0.0.1:{port}"


def _door(mesh, tmp_path, **env: str):
    proc, address, _ = start_door(mesh, **env)
    return proc, address


OFF = {"registry": (_registry, "CNEI_REGISTRY_"), "trainer": (_trainer, "CNEI_TRAINER_"),
       "runtime": (_runtime, "CNEI_RUNTIME_"), "coordinator behind its door": (_door, "CNEI_COORDINATOR_")}


@pytest.mark.parametrize("kind", _kinds(*OFF))
def test_grpc_reflection_false_turns_it_off_and_the_server_still_serves(kind, mesh, tmp_path):
    start, prefix = OFF[kind]
    proc, address = start(mesh, tmp_path, **{f"{prefix}GRPC_REFLECTION": "false"})
    try:
        with pytest.raises(grpc.RpcError) as refused:
            reflection.listed(address)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        infra.stop(proc)
