"""gRPC adapter of the registry core."""
from __future__ import annotations

import asyncio

from prometheus_client import Counter

from services.common import deployment
from services.common.errors import InvalidArgument
from services.common.grpc_util import rpc
from services.common.registry_convert import tombstone_to_proto, variant_to_proto
from services.pb.cnei import registry_pb2 as rpb
from services.pb.cnei import registry_pb2_grpc as rpb_grpc
from services.registry.core import PushHeader, Registry

SENT_BYTES = Counter("cnei_registry_artifact_bytes_sent_total",
                     "Artifact bytes sent to nodes, whole or as deltas against an artifact they hold", ["encoding"])


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
        sending = await self.registry.artifacts.artifact_for(request.sha256, list(request.have))
        first = True
        while (data := await asyncio.to_thread(next, sending.chunks, None)) is not None:
            SENT_BYTES.labels(sending.encoding or "full").inc(len(data))
            if first:
                yield rpb.ArtifactChunk(data=data, encoding=sending.encoding, base_sha256=sending.base)
                first = False
            else:
                yield rpb.ArtifactChunk(data=data)

    @rpc
    async def DeleteModel(self, request, context):
        removed, freed = await self.registry.deletion.delete_version(request.name, request.version, request.precision)
        return rpb.DeleteModelResponse(deleted=[variant_to_proto(v) for v in removed], freed_bytes=freed)

    @rpc
    async def ListDeleted(self, request, context):
        tombstones = await self.registry.deletion.deleted(request.model, request.since)
        return rpb.ListDeletedResponse(deleted=[tombstone_to_proto(t) for t in tombstones])

    @rpc
    async def RecordMeasurement(self, request, context):
        m = request.model
        variant = await self.registry.record_measurement(
            m.name, m.version, m.precision, request.node_class, request.node_id,
            request.latency_ms, request.memory_bytes)
        return variant_to_proto(variant)

    @rpc
    async def PutDeployment(self, request, context):
        spec, when = await self.registry.put_deployment(request.spec_json, request.updated_at)
        return rpb.Deployment(model=spec.model, spec_json=deployment.to_json(spec), updated_at=when)

    @rpc
    async def GetDeployment(self, request, context):
        (spec, when), = await self.registry.catalogue.deployments(request.model or "-")
        return rpb.Deployment(model=spec.model, spec_json=deployment.to_json(spec), updated_at=when)

    @rpc
    async def DeleteDeployment(self, request, context):
        spec_json, when = await self.registry.deletion.delete_deployment(request.model, request.if_updated_at)
        return rpb.Deployment(model=request.model, spec_json=spec_json, updated_at=when)

    @rpc
    async def ListDeployments(self, request, context):
        return rpb.ListDeploymentsResponse(deployments=[
            rpb.Deployment(model=s.model, spec_json=deployment.to_json(s), updated_at=w)
            for s, w in await self.registry.catalogue.deployments()])
