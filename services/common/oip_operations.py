"""The transport-free OIP operations shared by the gRPC and REST adapters, and their metrics."""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from prometheus_client import Counter, Histogram

from services.common import classification, oip
from services.common.deployment import DeploymentSpec
from services.common.errors import InvalidArgument, ModelNotFound, outcome_of
from services.common.model_spec import ModelVariant
from services.common.stats import ModelStats
from services.common.trace_settings import TraceSettings

UNKNOWN_MODEL = "_unknown"  # the model label of requests for a model this process does not know
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
    def request_failed(self, name: str, version: str, ns: int) -> None: ...
    def knows_model(self, name: str) -> bool: ...
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
def inference_metrics(core: InferenceCore, model: str,
                      outcome_of_error: Callable[[BaseException], str] = outcome_of):
    """Count and time one inference by model and outcome (gRPC, fast lane and REST alike; an
    adapter names the outcomes of its transport's own errors with `outcome_of_error`). A request
    its caller gave up on (its handler cancelled) is `cancelled`, never `ok`. A failed request
    counts under its model only when `core` knows the model (`knows_model`), and under `_unknown`
    otherwise, whatever failed (a malformed body included), so clients cannot grow the label set."""
    start, outcome = time.perf_counter(), "ok"
    try:
        yield
    except (Exception, asyncio.CancelledError) as exc:
        outcome = outcome_of_error(exc)
        raise
    finally:
        known = outcome == "ok" or core.knows_model(model)
        record_inference(model if known else UNKNOWN_MODEL, outcome, time.perf_counter() - start)


@contextmanager
def failure_counted(core: InferenceCore, name: str, version: str):
    """What an adapter does with a request before the core has it (decoding it): a failure there
    is still the request's, so it counts in the statistics of the model version it names
    (`request_failed`), as Triton counts a request it refuses before the model runs it."""
    start = time.perf_counter_ns()
    try:
        yield
    except (Exception, asyncio.CancelledError):  # cancelled: a REST client hanging up mid-body
        core.request_failed(name, version, time.perf_counter_ns() - start)
        raise


def record_inference(model: str, outcome: str, seconds: float) -> None:
    """Count one inference and its end-to-end time (also for requests a front door answered)."""
    count, latency = _series(model if model and outcome != "not_found" else UNKNOWN_MODEL, outcome)
    count.inc()
    latency.observe(seconds)


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


def named_model(name: str) -> str:
    """A model name asked about (metadata, configuration): '' is no model (NOT_FOUND, as Triton)."""
    if not name:
        raise ModelNotFound(name)
    return name


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


async def trace_setting(core: InferenceCore, tracing: TraceSettings, model: str,
                        changes: dict[str, list[str] | None] | None) -> dict[str, list[str]]:
    """Triton's trace setting call (gRPC and REST): the settings that apply to `model` (empty:
    the global ones) after applying `changes`, if any. NOT_FOUND for a model the core lacks."""
    if model:
        await core.model_variant(model)
    return await tracing.update(model, changes or {})
