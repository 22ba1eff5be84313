"""A real Coordinator behind a real grpc.aio OIP server, forwarding over real gRPC to stand-in
runtimes (each a grpc.aio server with the OIP servicer over a small in-process core, and with
`fast_lane` a fast-lane server too). Only the registry and Redis are replaced: the catalog and the
node directory are held in memory. With `door`, the coordinator also serves FrontDoorControl, as
it does behind its compiled front door."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from services.common import lifecycle, oip
from services.common.deployment import DeploymentSpec
from services.common.errors import CneiError, ErrorCode, InvalidArgument, ModelNotFound
from services.common.fastlane import FastServer
from services.common.model_spec import ModelVariant, TensorSpec
from services.common.nodes import NodeInfo
from services.common.oip_servicer import OipServicer
from services.common.served import served_version
from services.coordinator.core import Coordinator
from services.coordinator.door import DoorRoutes
from services.coordinator.door_servicer import FrontDoorServicer
from services.coordinator.nodes_view import NodesView
from services.coordinator.settings import CoordinatorSettings
from services.pb.cnei import frontdoor_pb2_grpc as fd_grpc
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

Outputs = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def variant(name: str = "m", outputs: tuple = (("y", "FP32", (-1, 2)),), **metadata: str) -> ModelVariant:
    """A batching model of one input `x` [-1, 2] (FP32)."""
    return ModelVariant(name, "1", "FP32", "0", 1, [TensorSpec("x", "FP32", (-1, 2))],
                        [TensorSpec(*o) for o in outputs], metadata={"max_batch_size": "8", **metadata})


def echo(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"].copy()}


class Catalog:
    """The registry's answers, from memory."""

    def __init__(self, variants: list[ModelVariant], specs: dict[str, DeploymentSpec]):
        self._variants, self._specs = variants, specs

    async def variants(self, model: str, version: str = "") -> list[ModelVariant]:
        found = [v for v in self._variants if v.name == model]
        if not found:
            raise ModelNotFound(model, version)
        return found

    async def all_variants(self, model: str) -> list[ModelVariant]:
        return [v for v in self._variants if v.name == model]

    async def deployment(self, model: str) -> DeploymentSpec:
        return self._specs.get(model) or DeploymentSpec(model=model)


class NodeCore:
    """A runtime stand-in: answers `outputs(inputs)` after `delay_s`, and INTERNAL for the models
    named in `failing` (a model broken on this node); notes every call it got, and its model."""
    server_name, server_version = "stand-in-runtime", "0"

    def __init__(self, outputs: Outputs = echo, delay_s: float = 0.0, failing: tuple[str, ...] = ()):
        self.outputs, self.delay_s, self.failing = outputs, delay_s, failing
        self.calls: list[dict[str, np.ndarray]] = []
        self.models: list[str] = []  # the model of each call, in order
        self.parameters: list[dict] = []  # the parameters of each call, in order

    async def ready(self) -> bool:
        return True

    def request_failed(self, name: str, version: str, ns: int) -> None:
        """A malformed request its servicer refused: a stand-in keeps no statistics."""

    def knows_model(self, name: str) -> bool:
        """A model it was asked to run."""
        return name in self.models

    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None) -> oip.InferResponse:
        self.calls.append({k: v.copy() for k, v in request.inputs.items()})
        self.models.append(request.model_name)
        self.parameters.append(dict(request.parameters))
        await asyncio.sleep(self.delay_s)
        if request.model_name in self.failing:
            raise CneiError(f"onnx runtime: model '{request.model_name}' cannot run here", ErrorCode.INTERNAL)
        return oip.InferResponse(request.model_name, self.outputs(request.inputs), request.model_version)

    @property
    def markers(self) -> list[float]:
        """The first value of every row the node was sent, in order."""
        return [float(row[0]) for call in self.calls for row in call["x"]]


class VersionedCatalog(Catalog):
    """The registry's answers with versions as the real catalog resolves them: the one asked
    for, else the one the deployment serves (`served.served_version`)."""

    async def variants(self, model: str, version: str = "") -> list[ModelVariant]:
        found = await self.all_variants(model)
        version = version or served_version(await self.deployment(model), found)
        chosen = [v for v in found if v.version == version]
        if not chosen:
            raise ModelNotFound(model, version)
        return chosen


class VersionedNode(NodeCore):
    """Answers x times the version it is asked for: which version computed an answer shows."""

    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None) -> oip.InferResponse:
        response = await super().infer(request, deadline_s)
        response.outputs = {"y": response.outputs["y"] * float(request.model_version)}
        return response


class Directory:
    """The live nodes, as Redis would list them."""

    def __init__(self, nodes: list[NodeInfo]):
        self.nodes = list(nodes)

    async def live_nodes(self) -> list[NodeInfo]:
        return list(self.nodes)


def fast_handler(servicer: OipServicer):
    """A fast-lane server's handler: ModelInfer messages through `servicer`, as a runtime's."""
    async def handle(payload: bytes, timeout: float | None) -> bytes:
        try:
            request = pb.ModelInferRequest.FromString(payload)
        except Exception as exc:  # noqa: BLE001 - a malformed message
            raise InvalidArgument(f"not a ModelInferRequest: {exc}") from None
        return (await servicer.infer_message(request, timeout)).SerializeToString()
    return handle


@dataclass
class Mesh:
    stub: pb_grpc.GRPCInferenceServiceStub
    core: Coordinator
    view: NodesView
    directory: Directory
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    door: DoorRoutes | None = None  # with `door`: the routes FrontDoorControl hands out
    door_stub: fd_grpc.FrontDoorControlStub | None = None
    address: str = ""  # the coordinator's gRPC address (a compiled front door's backend)

    async def infer(self, model: str = "m", x: np.ndarray | None = None, params: dict | None = None,
                    outputs: tuple[str, ...] = (), timeout: float = 10.0) -> tuple[str, object]:
        """("OK", response) or (status name, details)."""
        message = oip.request_to_proto(oip.InferRequest(
            model, {"x": np.ones((1, 2), np.float32) if x is None else x}, parameters=params or {},
            outputs=list(outputs)))
        try:
            return "OK", oip.response_from_proto(await self.stub.ModelInfer(message, timeout=timeout))
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details()

    def call(self, model: str = "m", x: np.ndarray | None = None, params: dict | None = None):
        """A ModelInfer call the test may cancel."""
        message = oip.request_to_proto(oip.InferRequest(
            model, {"x": np.ones((1, 2), np.float32) if x is None else x}, parameters=params or {}))
        return self.stub.ModelInfer(message, timeout=10.0)

    async def leave_and_join(self, *node_ids: str) -> None:
        """The directory now lists `node_ids` only; the view sees it."""
        self.directory.nodes = [self.nodes[n] for n in node_ids]
        await self.view.refresh()


@contextlib.asynccontextmanager
async def mesh(variants: list[ModelVariant], specs: dict[str, DeploymentSpec], cores: dict[str, NodeCore],
               tiers: dict[str, str] | None = None, live: tuple[str, ...] | None = None,
               fast_lane: bool = False, door: bool = False, **settings) -> AsyncIterator[Mesh]:
    """Stand-in runtimes `cores` (by node id; edge unless `tiers` says otherwise; `live`: those
    the directory lists at first, default all; `fast_lane`: each offers one, which the coordinator
    then uses) and a coordinator serving OIP over them (and FrontDoorControl, with `door`)."""
    servers, fast_servers, nodes = [], [], {}
    coordinator_server = view = core = channel = None
    try:
        for node_id, node_core in cores.items():
            server = lifecycle.GrpcServer("127.0.0.1", 0)
            server.add(pb_grpc.add_GRPCInferenceServiceServicer_to_server, OipServicer(node_core),
                       "inference.GRPCInferenceService")
            await server.start()
            servers.append(server)
            fast_address = ""
            if fast_lane:
                fast_servers.append(FastServer(fast_handler(OipServicer(node_core))))
                fast_address = f"127.0.0.1:{await fast_servers[-1].start('127.0.0.1', 0)}"
            nodes[node_id] = NodeInfo(node_id, (tiers or {}).get(node_id, "edge"), "r1", server.address, cpus=4,
                                      models=[v.key for v in variants], fast_address=fast_address)
        directory = Directory([nodes[n] for n in (live if live is not None else nodes)])
        view = NodesView(directory, refresh_s=3600.0, grace_s=0.0)  # a node left is gone at once
        core = Coordinator(CoordinatorSettings(front_door="off", **settings), Catalog(variants, specs), view)
        view.on_change = core.node_changed
        await view.refresh()
        coordinator_server = lifecycle.GrpcServer("127.0.0.1", 0)
        coordinator_server.add(pb_grpc.add_GRPCInferenceServiceServicer_to_server, OipServicer(core),
                               "inference.GRPCInferenceService")
        routes = DoorRoutes(core, ttl_ms=100) if door else None
        if routes is not None:
            coordinator_server.add(fd_grpc.add_FrontDoorControlServicer_to_server, FrontDoorServicer(routes),
                                   "cnei.frontdoor.v1.FrontDoorControl")
        await coordinator_server.start()
        channel = grpc.aio.insecure_channel(coordinator_server.address)
        yield Mesh(pb_grpc.GRPCInferenceServiceStub(channel), core, view, directory, nodes, routes,
                   fd_grpc.FrontDoorControlStub(channel) if door else None, coordinator_server.address)
    finally:
        if channel is not None:
            await channel.close()
        if coordinator_server is not None:
            await coordinator_server.stop(0)
        if core is not None:
            await core.close()
        if view is not None:
            await view.close()
        for server in servers:
            await server.stop(0)
        for fast in fast_servers:
            await fast.stop(0)
