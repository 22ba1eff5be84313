"""The OIP (KServe v2 / Triton) gRPC adapter, shared by the coordinator and every runtime."""
from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from prometheus_client import Counter, Histogram

from services.common import classification, codec, log_settings, oip
from services.common.deployment import DeploymentSpec, ensemble_plan
from services.common.errors import CneiError, InvalidArgument, ModelNotFound, outcome_of
from services.common.grpc_util import rpc
from services.common.model_spec import ModelVariant, served_max_batch_size
from services.common.ordered import map_in_order
from services.common.shm import SharedMemoryRegions, cuda_status, refuse_cuda
from services.common.stats import ModelStats
from services.common.trace_settings import PICKED_HEADER, MemoryTraceStore, TraceSettings
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
PLATFORM = "onnxruntime_onnx"


def platform(variant: ModelVariant) -> str:
    """Triton's platform name: ensembles are "ensemble", every artifact an ONNX Runtime model."""
    return "ensemble" if variant.format == "ensemble" else PLATFORM
# Requests of one ModelStreamInfer stream started and not yet answered; beyond it the stream is
# not read until the oldest is answered (the client sees flow control, nothing is dropped).
STREAM_WINDOW = 256
EXTENSIONS = ["classification", "model_configuration", "statistics", "model_repository", "schedule_policy",
              "parameters", "system_shared_memory", "binary_tensor_data", "trace", "logging"]

INFER_REQUESTS = Counter(
    "cnei_inference_requests_total", "Inference requests by model and outcome", ["model", "outcome"]
)
INFER_LATENCY = Histogram(
    "cnei_inference_request_duration_seconds", "End-to-end ModelInfer latency", ["model", "outcome"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)


@dataclass(frozen=True)
class Instance:
    """How a runtime runs a variant it has loaded: ModelConfig's instance_group and the ONNX
    Runtime parameter Triton's onnxruntime backend names `intra_op_thread_count`."""

    gpu: bool
    intra_op_threads: int


class InferenceCore(Protocol):
    """What an OIP server needs from its core (coordinator or runtime)."""

    server_name: str
    server_version: str

    async def ready(self) -> bool: ...
    async def model_ready(self, name: str, version: str) -> bool: ...
    async def model_variant(self, name: str, version: str = "") -> ModelVariant: ...
    async def model_versions(self, name: str) -> list[str]: ...
    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None) -> oip.InferResponse: ...
    def statistics(self, name: str, version: str) -> list[ModelStats]: ...
    async def repository_index(self) -> list[ModelVariant]: ...
    async def unloaded_models(self) -> frozenset[str]: ...
    async def load_model(self, name: str) -> None: ...
    async def unload_model(self, name: str) -> None: ...
    async def deployment(self, name: str) -> DeploymentSpec | None: ...
    def instance(self, variant: ModelVariant) -> Instance | None: ...


@functools.lru_cache(maxsize=None)
def _series(model: str, outcome: str) -> tuple:
    """The (counter, histogram) children for one label pair, looked up once."""
    return INFER_REQUESTS.labels(model, outcome), INFER_LATENCY.labels(model, outcome)


@contextmanager
def inference_metrics(model: str):
    """Count and time one inference by model and outcome (gRPC, fast lane and REST alike).
    Unknown models are counted under `_unknown` so clients cannot grow the label set."""
    start, outcome = time.perf_counter(), "ok"
    try:
        yield
    except Exception as exc:
        outcome = outcome_of(exc)
        raise
    finally:
        record_inference(model, outcome, time.perf_counter() - start)


def record_inference(model: str, outcome: str, seconds: float) -> None:
    """Count one inference and its end-to-end time (also for requests a front door answered)."""
    count, latency = _series(model if model and outcome != "not_found" else "_unknown", outcome)
    count.inc()
    latency.observe(seconds)


def metadata_to_proto(variant: ModelVariant, versions: list[str]) -> pb.ModelMetadataResponse:
    def tensors(specs):
        return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
                for s in specs]
    return pb.ModelMetadataResponse(
        name=variant.name, versions=versions, platform=platform(variant),
        inputs=tensors(variant.inputs), outputs=tensors(variant.outputs),
    )


def config_to_proto(variant: ModelVariant, deployment: DeploymentSpec | None = None,
                    instance: Instance | None = None) -> pb.ModelConfigResponse:
    """Triton ModelConfig: dims exclude the batch dimension when max_batch_size > 0; where there
    is a deployment (the coordinator's; a runtime's own batching rules), a batching model's
    `dynamic_batching` carries its rules (no deployment: the server does not batch) and
    `response_cache` says whether it caches responses; where the variant is loaded (runtime), the
    instance group's kind and `intra_op_thread_count` say how it runs. A batching model's
    `max_batch_size` is the largest batch the server forms and the most rows a client's request
    may hold, as in Triton (`served_max_batch_size`)."""
    batching = served_max_batch_size(variant, deployment)
    forms_batches = bool(batching) and deployment is not None and not deployment.ensemble
    def dims(shape):
        return list(shape[1:] if batching else shape)
    config = pb.ModelConfig(
        name=variant.name, platform=platform(variant), backend="" if variant.format == "ensemble" else "onnxruntime",
        max_batch_size=batching,
        input=[pb.ModelInput(name=s.name, data_type=codec.TRITON_TYPE[s.datatype], dims=dims(s.shape))
               for s in variant.inputs],
        output=[pb.ModelOutput(name=s.name, data_type=codec.TRITON_TYPE[s.datatype], dims=dims(s.shape))
                for s in variant.outputs],
        instance_group=[pb.ModelInstanceGroup(
            name=variant.name, count=1,
            kind=pb.ModelInstanceGroup.KIND_GPU if instance and instance.gpu else pb.ModelInstanceGroup.KIND_CPU)],
    )
    if deployment is not None and deployment.ensemble:
        for step, (reads, writes) in zip(deployment.ensemble, ensemble_plan(deployment).maps):
            config.ensemble_scheduling.step.add(
                model_name=step.model, model_version=int(step.version) if step.version.isdigit() else -1,
                input_map=dict(reads), output_map=dict(writes))
    elif forms_batches:  # the server batches (no deployment: clients' batches only)
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.preferred_batch_size.extend(deployment.batching.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = deployment.batching.max_queue_delay_us
    if deployment is not None and deployment.response_cache:
        config.response_cache.enable = True
    for key, value in variant.metadata.items():
        config.parameters[key].string_value = value
    if instance is not None and not instance.gpu:
        config.parameters["intra_op_thread_count"].string_value = str(instance.intra_op_threads)
    return pb.ModelConfigResponse(config=config)


def _duration(d) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def stats_to_proto(s: ModelStats) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=s.name, version=s.version, last_inference=s.last_inference_ms,
        inference_count=s.inference_count, execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success), fail=_duration(s.fail), queue=_duration(s.queue),
            # the requests that ran the model (not those answered from a response cache): clients
            # such as perf_analyzer require the three compute counts to agree
            compute_input=pb.StatisticDuration(count=s.compute_infer.count),
            compute_infer=_duration(s.compute_infer),
            compute_output=pb.StatisticDuration(count=s.compute_infer.count),
            cache_hit=_duration(s.cache_hit), cache_miss=_duration(s.cache_miss),
        ),
        batch_stats=[pb.InferBatchStatistics(batch_size=b, compute_infer=_duration(d))
                     for b, d in sorted(s.batches.items())],
    )


async def statistics(core: InferenceCore, name: str, version: str) -> list[ModelStats]:
    """Like Triton, every known model is listed, with zeros where this process has served
    none of it (clients such as perf_analyzer compare snapshots taken on any connection,
    which with several coordinator workers may land on a worker that served nothing)."""
    stats = core.statistics(name, version)
    if name:
        if not stats:
            variant = await core.model_variant(name, version)  # NOT_FOUND when unknown
            stats = [ModelStats(variant.name, variant.version)]
        return stats
    seen = {(s.name, s.version) for s in stats}
    for v in await core.repository_index():
        if (v.name, v.version) not in seen:
            seen.add((v.name, v.version))
            stats.append(ModelStats(v.name, v.version))
    return stats


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str  # READY | UNAVAILABLE, as Triton names them
    reason: str = ""


async def repository_models(core: InferenceCore, ready_only: bool = False) -> list[IndexEntry]:
    """Every model version the repository holds, each once, with its state."""
    unloaded = await core.unloaded_models()
    seen: dict[tuple[str, str], IndexEntry] = {}
    for v in await core.repository_index():
        if (v.name, v.version) not in seen:
            seen[(v.name, v.version)] = (IndexEntry(v.name, v.version, "UNAVAILABLE", "unloaded")
                                         if v.name in unloaded else IndexEntry(v.name, v.version, "READY"))
    return [e for e in seen.values() if e.state == "READY" or not ready_only]


def _named(name: str) -> str:
    """A model name asked about (metadata, configuration): '' is no model (NOT_FOUND, as Triton)."""
    if not name:
        raise ModelNotFound(name)
    return name


def _model_name(request) -> str:
    if not request.model_name:
        raise InvalidArgument("model_name is required")
    if request.repository_name:
        raise InvalidArgument(f"there is one model repository (the registry); repository_name "
                              f"'{request.repository_name}' is not known")
    return request.model_name


def refuse_load_overrides(model: str, parameters) -> None:
    """Triton's load parameters that replace a model's configuration (`config`) or files
    (`file:<path>`) are not offered: INVALID_ARGUMENT rather than a load that ignores them."""
    for key in parameters:
        if key == "config":
            raise InvalidArgument(f"model '{model}': load parameter 'config' is not offered: a model's configuration "
                                  f"comes from the registry and its deployment (cnei deploy apply); load it without one")
        if key.startswith("file:"):
            raise InvalidArgument(f"model '{model}': load parameter '{key}' is not offered: model files are pushed "
                                  f"to the registry (cnei models push); load it without them")


async def _sample(servicer: "OipServicer", request: pb.ModelInferRequest, metadata: dict) -> bool:
    """Whether a ModelInfer that came without trace context starts a trace (trace settings)."""
    return await servicer.tracing.pick(request.model_name, picked=PICKED_HEADER in metadata)


async def classified(core: InferenceCore, request: oip.InferRequest, response: oip.InferResponse) -> oip.InferResponse:
    """Triton's classification extension (gRPC and REST): the outputs `request` asks classes of,
    as their top classes, labelled by the model's `labels` metadata; a new response (the core's
    may be a cached one)."""
    if not request.classes:
        return response
    variant = await core.model_variant(response.model_name, response.model_version)
    outputs = classification.classify(response.outputs, request.classes, classification.labels_of(variant.metadata),
                                      batched=variant.max_batch_size > 0)
    return replace(response, outputs=outputs)


async def model_config(core: InferenceCore, name: str, version: str) -> pb.ModelConfigResponse:
    """Triton's ModelConfig (gRPC and REST): the model's default variant with its deployment."""
    variant = await core.model_variant(_named(name), version)
    return config_to_proto(variant, await core.deployment(variant.name), core.instance(variant))


async def trace_setting(core: InferenceCore, tracing: TraceSettings, model: str,
                        changes: dict[str, list[str] | None] | None) -> dict[str, list[str]]:
    """Triton's trace setting call (gRPC and REST): the settings that apply to `model` (empty:
    the global ones) after applying `changes`, if any. NOT_FOUND for a model the core lacks."""
    if model:
        await core.model_variant(model)
    return await tracing.update(model, changes or {})


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
        variant = await self.core.model_variant(_named(request.name), request.version)
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
        with inference_metrics(request.model_name):
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
