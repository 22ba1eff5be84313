"""The OIP (KServe v2 / Triton) gRPC adapter, shared by the coordinator and every runtime."""
from __future__ import annotations

import logging

from services.common import log_settings, oip
from services.common.errors import CneiError, InvalidArgument
from services.common.grpc_util import rpc
from services.common.oip_convert import metadata_to_proto, model_config, stats_to_proto
from services.common.oip_operations import (EXTENSIONS, InferenceCore, classified, failure_counted, inference_metrics,
                                            named_model, refuse_load_overrides, repository_models, statistics,
                                            trace_setting)
from services.common.ordered import map_in_order
from services.common.shm import SharedMemoryRegions, cuda_status, refuse_cuda
from services.common.trace_settings import PICKED_HEADER, MemoryTraceStore, TraceSettings
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
# Requests of one ModelStreamInfer stream started and not yet answered; beyond it the stream is
# not read until the oldest is answered (the client sees flow control, nothing is dropped).
STREAM_WINDOW = 256


def _model_name(request) -> str:
    if not request.model_name:
        raise InvalidArgument("model_name is required")
    if request.repository_name:
        raise InvalidArgument(f"there is one model repository (the registry); repository_name "
                              f"'{request.repository_name}' is not known")
    return request.model_name


async def _sample(servicer: "OipServicer", request: pb.ModelInferRequest, metadata: dict) -> bool:
    """Whether a ModelInfer that came without trace context starts a trace (trace settings)."""
    return await servicer.tracing.pick(request.model_name, picked=PICKED_HEADER in metadata)


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Converts OIP messages, awaits the core, converts the answer."""

    def __init__(self, core: InferenceCore, shm: SharedMemoryRegions | None = None,
                 tracing: TraceSettings | None = None, logs: log_settings.LogSettings | None = None):
        self.core = core
        self.shm = shm if shm is not None else SharedMemoryRegions()
        self.tracing = tracing if tracing is not None else TraceSettings(MemoryTraceStore())
        self.logs = logs if logs is not None else log_settings.LogSettings()

    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.core.ready())

    @rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=self.core.server_name, version=self.core.server_version, extensions=EXTENSIONS
        )

    @rpc
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=await self.core.model_ready(request.name, request.version))

    @rpc
    async def ModelMetadata(self, request, context):
        variant = await self.core.model_variant(named_model(request.name), request.version)
        return metadata_to_proto(variant, await self.core.model_versions(request.name))

    @rpc
    async def ModelConfig(self, request, context):
        return await model_config(self.core, request.name, request.version)

    @rpc
    async def ModelStatistics(self, request, context):
        stats = await statistics(self.core, request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[stats_to_proto(s) for s in stats])

    @rpc
    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in await repository_models(self.core, request.ready)])

    @rpc
    async def RepositoryModelLoad(self, request, context):
        refuse_load_overrides(request.model_name, request.parameters)
        await self.core.load_model(_model_name(request))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        await self.core.unload_model(_model_name(request))
        return pb.RepositoryModelUnloadResponse()

    @rpc
    async def SystemSharedMemoryStatus(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for r in self.shm.status(request.name):
            response.regions[r.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return response

    @rpc
    async def SystemSharedMemoryRegister(self, request, context):
        region = self.shm.register(request.name, request.key, request.offset, request.byte_size)
        log.info("shared memory region '%s' registered: %d bytes at %d of '%s'", region.name,
                 region.byte_size, region.offset, region.key)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(self, request, context):
        self.shm.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryStatus(self, request, context):
        cuda_status(request.name)
        return pb.CudaSharedMemoryStatusResponse()

    @rpc
    async def CudaSharedMemoryRegister(self, request, context):
        refuse_cuda(request.name)

    @rpc
    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()  # none is ever registered

    @rpc
    async def TraceSetting(self, request, context):
        changes = {name: list(value.value) or None for name, value in request.settings.items()}
        settings = await trace_setting(self.core, self.tracing, request.model_name, changes)
        response = pb.TraceSettingResponse()
        for name, values in settings.items():
            response.settings[name].value.extend(values)
        return response

    @rpc
    async def LogSettings(self, request, context):
        changes = {}
        for name, value in request.settings.items():
            kind = value.WhichOneof("parameter_choice")
            if kind is None:
                raise InvalidArgument(f"log setting '{name}' has no value")
            changes[name] = getattr(value, kind)
        settings = await self.logs.update(changes)
        response = pb.LogSettingsResponse()
        for name, value in settings.items():
            kind = "bool_param" if isinstance(value, bool) else "uint32_param" if isinstance(value, int) else "string_param"
            setattr(response.settings[name], kind, value)
        return response

    @rpc(sample=_sample)
    async def ModelInfer(self, request, context):
        return await self.infer_message(request, context.time_remaining())

    async def infer_message(self, request: pb.ModelInferRequest, deadline_s: float | None) -> pb.ModelInferResponse:
        """One ModelInfer, message in and out, with metrics (shared by gRPC and the fast lane)."""
        with inference_metrics(self.core, request.model_name):
            with failure_counted(self.core, request.model_name, request.model_version):
                req = oip.request_from_proto(request, self.shm)
            resp = await classified(self.core, req, await self.core.infer(req, deadline_s))
            return oip.response_to_proto(resp, raw=req.raw, places=req.output_places, shm=self.shm)

    @rpc
    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's stream semantics: each request starts as it arrives (requests of one stream
        batch together), responses leave in request order, and a failed request answers with
        `error_message` while the stream goes on."""
        async def one(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                response = await self.infer_message(request, context.time_remaining())
                return pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:  # noqa: BLE001 - one request's failure, never the stream's
                if not isinstance(exc, CneiError):
                    log.exception("stream request for model '%s' failed", request.model_name)
                    exc = CneiError(f"internal error: {type(exc).__name__}: {exc}")
                return pb.ModelStreamInferResponse(
                    error_message=f"{exc.code.value}: {exc.message}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
                )

        async for reply in map_in_order(request_iterator, one, STREAM_WINDOW):
            yield reply
