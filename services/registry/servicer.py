"""gRPC adapter of the registry core."""
from __future__ import annotations

import asyncio

from services.common.errors import InvalidArgument
from services.common.grpc_util import rpc
from services.common.registry_convert import variant_to_proto
from services.pb.cnei import registry_pb2 as rpb
from services.pb.cnei import registry_pb2_grpc as rpb_grpc
from services.registry.core import PushHeader, Registry


class RegistryServicer(rpb_grpc.ModelRegistryServicer):
    def __init__(self, registry: Registry):
        self.registry = registry

    @rpc
    async def PushModel(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("PushModel stream must start with a header chunk")
        h = first.header
        header = PushHeader(h.name, h.version, h.precision, h.format, dict(h.metadata))

        async def data():
            async for chunk in request_iterator:
                if chunk.WhichOneof("part") != "data":
                    raise InvalidArgument("PushModel stream has a second header")
                yield chunk.data

        return variant_to_proto(await self.registry.add_version(header, data()))

    @rpc
    async def ListModels(self, request, context):
        variants = await self.registry.list(request.name)
        return rpb.ListModelsResponse(models=[variant_to_proto(v) for v in variants])

    @rpc
    async def GetModel(self, request, context):
        return variant_to_proto(
            await self.registry.get(request.name, request.version, request.precision)
        )

    @rpc
    async def ResolveModel(self, request, context):
        return variant_to_proto(
            await self.registry.resolve(request.name, request.version, request.precision)
        )

    @rpc
    async def FetchArtifact(self, request, context):
        chunks = self.registry.artifact_chunks(request.sha256)
        while (data := await asyncio.to_thread(next, chunks, None)) is not None:
            yield rpb.ArtifactChunk(data=data)
