"""gRPC server reflection on every lifecycle.GrpcServer: it names the services the server registers
(with health and reflection itself) and describes them from CNEI's own protos, unrestricted, and
is gone when turned off; a private service (the front door's control service) is served unlisted. Real grpc.aio servers on free ports, read by grpcio-reflection's client."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import tritonclient.grpc  # noqa: F401 - puts Triton's `inference.*` in protobuf's default pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import lifecycle
from services.common import restricted as restricted_apis
from services.pb.cnei import frontdoor_pb2_grpc as fd_grpc
from services.pb.cnei import node_pb2_grpc as npb_grpc
from services.pb.cnei import registry_pb2_grpc as rpb_grpc
from services.pb.cnei import trainer_pb2_grpc as tpb_grpc
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests import reflection

HEALTH, REFLECTION = "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"
OIP = (pb_grpc.add_GRPCInferenceServiceServicer_to_server, pb_grpc.GRPCInferenceServiceServicer,
       "inference.GRPCInferenceService")
NODE = (npb_grpc.add_NodeControlServicer_to_server, npb_grpc.NodeControlServicer, "cnei.node.v1.NodeControl")
DOOR = (fd_grpc.add_FrontDoorControlServicer_to_server, fd_grpc.FrontDoorControlServicer,
        "cnei.frontdoor.v1.FrontDoorControl")
REGISTRY = (rpb_grpc.add_ModelRegistryServicer_to_server, rpb_grpc.ModelRegistryServicer,
            "cnei.registry.v1.ModelRegistry")
MODEL_INFER = "inference.GRPCInferenceService.ModelInfer"
TRAINER = (tpb_grpc.add_TrainerServicer_to_server, tpb_grpc.TrainerServicer, "cnei.trainer.v1.Trainer")
SERVERS = {"coordinator": (OIP,), "runtime": (OIP, NODE), "registry": (REGISTRY,), "trainer": (TRAINER,)}


@contextlib.asynccontextmanager
async def serving(services: tuple, **kwargs):
    """A started GrpcServer on a free port with `services` (their generated base servicers)."""
    server = lifecycle.GrpcServer("127.0.0.1", 0, **kwargs)
    for add, servicer, name in services:
        server.add(add, servicer(), name)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.mark.parametrize("kind", SERVERS)
async def test_reflection_lists_the_services_a_server_registers_with_health_and_itself(kind):
    async with serving(SERVERS[kind]) as server:
        names = await asyncio.to_thread(reflection.listed, server.address)
    assert names == sorted([name for _, _, name in SERVERS[kind]] + [HEALTH, REFLECTION])


@pytest.mark.parametrize("kind", SERVERS)
async def test_reflection_describes_every_service_it_lists_with_its_methods_types(kind):
    async with serving(SERVERS[kind]) as server:
        names = await asyncio.to_thread(reflection.listed, server.address)
        described = [await asyncio.to_thread(reflection.describe, server.address, name) for name in names]
    for name, service in zip(names, described):
        assert service.full_name == name and service.methods
        assert all(m.input_type.full_name and m.output_type.full_name for m in service.methods)


async def test_model_infer_is_described_from_cneis_own_proto_even_beside_tritonclients():
    async with serving((OIP,)) as server:
        infer = await asyncio.to_thread(reflection.describe, server.address, MODEL_INFER)
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert infer.output_type.full_name == "inference.ModelInferResponse"
    assert infer.containing_service.file.name == "services/pb/inference/grpc_service.proto"
    assert {"model_name", "inputs", "outputs", "raw_input_contents"} <= set(infer.input_type.fields_by_name)


@pytest.mark.parametrize("symbol", ["inference.GRPCInferenceService.NoSuchMethod", "inference.NoSuchService.ModelInfer",
                                    "ModelInfer"])
async def test_a_method_symbol_that_is_not_there_is_not_found(symbol):
    async with serving((OIP,)) as server:
        with pytest.raises(KeyError):
            await asyncio.to_thread(reflection.describe, server.address, symbol)


async def test_a_server_with_reflection_off_answers_unimplemented():
    async with serving((OIP,), reflection=False) as server:
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(reflection.listed, server.address)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_reflection_needs_no_key_where_every_category_is_restricted():
    every = ",".join(restricted_apis.categories_of(restricted_apis.RUNTIME_API))
    guard = restricted_apis.guard(f"{every}:admin-key=s3cret", restricted_apis.RUNTIME_API)
    async with serving((OIP, NODE), interceptors=guard) as server:
        names = await asyncio.to_thread(reflection.listed, server.address)
        infer = await asyncio.to_thread(reflection.describe, server.address, MODEL_INFER)
    assert "inference.GRPCInferenceService" in names
    assert infer.input_type.full_name == "inference.ModelInferRequest"


async def test_a_service_added_unlisted_is_served_but_neither_listed_nor_described():
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    (add_door, door, door_name), (add_oip, oip, oip_name) = DOOR, OIP
    server.add(add_door, door(), door_name, listed=False)
    server.add(add_oip, oip(), oip_name)
    await server.start()
    try:
        names = await asyncio.to_thread(reflection.listed, server.address)
        with pytest.raises(KeyError):
            await asyncio.to_thread(reflection.describe, server.address, door_name)
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=door_name))
    finally:
        await server.stop(0)
    assert names == sorted([oip_name, HEALTH, REFLECTION])
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_service_no_stubs_describe_is_left_out_and_the_server_still_serves(caplog):
    add, servicer, name = OIP
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(add, servicer(), name)
    server.add(lambda servicer, s: None, None, "cnei.Unknown")
    await server.start()
    try:
        names = await asyncio.to_thread(reflection.listed, server.address)
    finally:
        await server.stop(0)
    assert names == sorted([name, HEALTH, REFLECTION])
    assert "gRPC reflection leaves out cnei.Unknown" in caplog.text
