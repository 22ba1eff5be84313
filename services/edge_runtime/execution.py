"""Running loaded models: each ONNX Runtime call on a worker thread (or inline when it is shorter
than handing it over), booked as one execution; the requests of a batching model merged by a
batcher per variant and requested outputs, within the runtime's, the model's and the deployment's
batch sizes."""
from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from opentelemetry import trace

from services.common import oip, telemetry
from services.common.background import Background
from services.common.batcher import Batcher, BatchOutputs
from services.common.deployment import BatchingSpec
from services.common.errors import InvalidArgument
from services.common.model_spec import ModelVariant, check_outputs
from services.common.stats import StatsBook
from services.edge_runtime import accounting
from services.edge_runtime.accounting import CostModel, tensor_bytes, timed_run
from services.edge_runtime.l1 import L1Cache
from services.edge_runtime.loading import LoadedModel
from services.edge_runtime.settings import RuntimeSettings

_tracer = trace.get_tracer(__name__)
BatchKey = tuple[str, tuple[str, ...] | None]  # (variant key, requested outputs)


@dataclass(frozen=True)
class Run:
    """One ONNX Runtime call as the requests it carried see it."""

    started_ns: int  # perf_counter_ns when it started (a request's queue time ends there)
    compute_ns: int
    rows: int


class Execution:
    """The runtime's ONNX Runtime calls and the batchers that merge requests into them."""

    def __init__(self, settings: RuntimeSettings, l1: L1Cache, stats: StatsBook, cost_model: CostModel,
                 executor: ThreadPoolExecutor, background: Background):
        self.settings, self.l1, self.stats, self.cost_model = settings, l1, stats, cost_model
        self._executor, self.background = executor, background
        self.batchers: dict[BatchKey, tuple[LoadedModel, Batcher]] = {}

    async def drain(self, timeout_s: float) -> None:
        """Serve what the batchers hold, then stop them."""
        await asyncio.gather(*(b.drain_and_close(timeout_s) for _, b in self.batchers.values()),
                             return_exceptions=True)
        self.batchers.clear()

    def retire(self, key: str) -> None:
        """The variant leaves memory: its batchers run what they hold, then go (with the session)."""
        for batch_key in [k for k in self.batchers if k[0] == key]:
            self.background.spawn(self.batchers.pop(batch_key)[1].drain_and_close())

    def batches(self, loaded: LoadedModel) -> bool:
        """Requests of this model wait in a batcher: batching is on, the model takes a batch
        dimension and its calls run on worker threads (an inline call holds the event loop, so
        nothing could queue behind it)."""
        return (self.settings.batching and bool(loaded.variant.max_batch_size)
                and loaded.compute_us > self.settings.inline_max_us)

    def batcher(self, loaded: LoadedModel, outputs: list[str] | None, cap: int = 0) -> Batcher | None:
        """The batcher of (variant, requested outputs): requests asking for different outputs run
        apart. A variant loaded again (evicted, reloaded), or whose deployment `cap` changed, gets
        a new one. None when `loaded` left memory since its request took it (evicted while the cap
        was asked): that request runs on its own, and no batcher keeps the session alive."""
        if self.l1.peek(loaded.variant.key) is not loaded:
            return None
        key = (loaded.variant.key, tuple(outputs) if outputs else None)
        max_rows = batch_limit(self.settings.batch_max_size, loaded.variant.max_batch_size, cap)
        entry = self.batchers.get(key)
        if entry is not None and entry[0] is loaded and entry[1].config.max_batch_size == max_rows:
            return entry[1]
        if entry is not None:
            self.background.spawn(entry[1].drain_and_close())
        config = replace(
            batching_spec(self.settings), max_batch_size=max_rows,
            # a session on several threads has the cores to itself; one-thread sessions may run side by side
            max_inflight_batches=1 if loaded.model.intra_op_threads > 1 else max(1, self.settings.inference_workers))

        async def send(inputs: dict, rows: int, deadline: float) -> BatchOutputs:
            return await self.execute(loaded, inputs, outputs, rows)
        batcher = Batcher(loaded.variant.name, config, send, component="runtime", retry_alone=True)
        self.batchers[key] = (loaded, batcher)
        return batcher

    async def execute(self, loaded: LoadedModel, inputs: dict, outputs: list[str] | None, rows: int) -> BatchOutputs:
        """One ONNX Runtime call of `rows` rows (one request's, or a batch of several), booked as
        one execution: its outputs, with the `Run` every request it carried reports."""
        variant = loaded.variant
        with telemetry.child_span(_tracer, "ort.run") as span:
            result, cpu_s, started = await self._run(loaded, inputs, outputs)
            if span.is_recording():
                span.set_attributes({"cnei.provider": loaded.model.provider, "cnei.batch_size": rows})
        compute_ns = time.perf_counter_ns() - started
        loaded.observe(cpu_s)  # CPU time: a thread's wall time includes waiting for the GIL
        self.stats.get(variant.name, variant.version).execution(rows, compute_ns)
        accounting.record_run(run_labels(variant, self.settings), self.cost_model, rows, compute_ns / 1e9, cpu_s,
                              tensor_bytes(inputs) + tensor_bytes(result),
                              loaded.meter.joules(cpu_s, compute_ns / 1e9), loaded.meter.source)
        return BatchOutputs(result, Run(started, compute_ns, rows))

    async def _run(self, loaded: LoadedModel, inputs: dict, outputs: list[str] | None):
        """One ORT call: on a worker thread, or inline when the model's calls take less than
        `inline_max_us` (handing a 30 µs call to a thread costs more than the call itself)."""
        if loaded.compute_us <= self.settings.inline_max_us:
            return timed_run(loaded.model.run, inputs, outputs)
        async with loaded.turn if loaded.model.intra_op_threads > 1 else contextlib.nullcontext():
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, timed_run, loaded.model.run, inputs, outputs)


def run_labels(variant: ModelVariant, settings: RuntimeSettings) -> dict[str, str]:
    """The metric labels of the variant's requests and runs on this node."""
    return {"model": variant.name, "version": variant.version, "precision": variant.precision,
            "node": settings.node_id, "tier": settings.tier}


def batching_spec(settings: RuntimeSettings) -> BatchingSpec:
    """This runtime's batching rules, from its settings (each variant's batcher caps the
    batch size by the model's and its deployment's, `batch_limit`)."""
    return BatchingSpec(max_batch_size=settings.batch_max_size, max_queue_delay_us=settings.batch_queue_delay_us,
                        max_queue_size=settings.batch_queue_size)


def batch_limit(configured: int, model_max: int, cap: int = 0) -> int:
    """Rows one call of the runtime's batcher may carry: its setting (0: the model's limit),
    within the model's own limit and the deployment's `cap` (0: none); at least 1."""
    limit = min(configured, model_max) if configured > 0 else model_max
    if cap > 0:
        limit = min(limit, cap)
    return max(1, limit)


def check_batching(settings: RuntimeSettings) -> None:
    """The batching settings make sense (ValueError naming the one that does not)."""
    for name, value, least in (("BATCH_MAX_SIZE", settings.batch_max_size, 0),
                               ("BATCH_QUEUE_DELAY_US", settings.batch_queue_delay_us, 0),
                               ("BATCH_QUEUE_SIZE", settings.batch_queue_size, 1)):
        if value < least:
            raise ValueError(f"CNEI_RUNTIME_{name} must be at least {least}, got {value}")


def requested_outputs(variant: ModelVariant, names: list[str]) -> list[str] | None:
    check_outputs(variant, names)
    return names or None


def batch_size(variant: ModelVariant, request: oip.InferRequest) -> int:
    if not variant.max_batch_size or not request.inputs:
        return 1
    first = next(iter(request.inputs.values()))
    if not first.shape:
        raise InvalidArgument("batched model needs a batch dimension")
    return int(first.shape[0])
