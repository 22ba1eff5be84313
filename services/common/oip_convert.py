"""OIP model metadata, configuration and statistics as gRPC messages (gRPC and REST alike)."""
from __future__ import annotations

from services.common import codec
from services.common.deployment import DeploymentSpec
from services.common.ensemble_plan import ensemble_plan
from services.common.model_spec import ModelVariant, served_max_batch_size
from services.common.oip_operations import InferenceCore, Instance, named_model
from services.common.stats import ModelStats
from services.pb.inference import grpc_service_pb2 as pb

PLATFORM = "onnxruntime_onnx"


def platform(variant: ModelVariant) -> str:
    """Triton's platform name: ensembles are "ensemble", every artifact an ONNX Runtime model."""
    return "ensemble" if variant.format == "ensemble" else PLATFORM


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


async def model_config(core: InferenceCore, name: str, version: str) -> pb.ModelConfigResponse:
    """Triton's ModelConfig (gRPC and REST): the model's default variant with its deployment."""
    variant = await core.model_variant(named_model(name), version)
    return config_to_proto(variant, await core.deployment(variant.name), core.instance(variant))
