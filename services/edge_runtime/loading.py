"""Loading models into a runtime's memory: the session opened from the disk cache (repaired once
when its bytes rotted), measured and reported to the registry, its sibling precisions measured
in the background, and what its arrival evicts from memory let go."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry import trace

from services.common import telemetry
from services.common.background import Background, KeyedLocks
from services.common.errors import CneiError, ErrorCode, ModelNotFound, error_for
from services.common.model_spec import ModelVariant, sample_inputs
from services.common.registry_client import RegistryClient
from services.edge_runtime.disk_sync import DiskSync
from services.edge_runtime.emulation import slowed
from services.edge_runtime.energy import CpuEnergy, EnergyMeter, choose_meter, open_nvml
from services.edge_runtime.resolution import Resolver
from services.edge_runtime.runner import (TUNE_BATCH, OrtModel, available_cores, measure_variant, rss_bytes,
                                          tuned_model)
from services.edge_runtime.settings import RuntimeSettings
from services.edge_runtime.siblings import Activity, SiblingMeasurer

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)


@dataclass
class LoadedModel:
    variant: ModelVariant
    model: OrtModel
    load_seconds: float
    meter: EnergyMeter
    compute_us: float = float("inf")  # EWMA of one ORT call's CPU time; decides inline runs
    # A session running on several intra-op threads has the cores to itself: its calls take
    # turns (two at once would only contend; the next one waits here, decoded and ready).
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    def observe(self, cpu_seconds: float) -> None:
        sample = cpu_seconds * 1e6
        self.compute_us = sample if self.compute_us == float("inf") else 0.8 * self.compute_us + 0.2 * sample


class Loader:
    """Puts variants in the L1 cache, one load per variant however many ask at once (never one
    deleted from the registry), and takes them out. `retire`: what else must let go of a variant
    leaving memory (its batchers)."""

    def __init__(self, settings: RuntimeSettings, registry: RegistryClient, sync: DiskSync, resolver: Resolver,
                 executor: ThreadPoolExecutor, background: Background, activity: Callable[[], Activity],
                 retire: Callable[[str], None]):
        self.settings, self.registry, self.sync, self.resolver = settings, registry, sync, resolver
        self.disk, self.l1, self.deleted = sync.disk, sync.l1, sync.deleted
        self._executor, self.background, self._retire = executor, background, retire
        self._load_locks = KeyedLocks()  # by variant key
        self._cpu_energy = CpuEnergy(settings.watts_per_core)
        self._nvml = open_nvml(settings.gpu_index) if settings.energy_source != "cpu" else None
        self.siblings = SiblingMeasurer(registry, settings, sync.held_artifact, self.report, activity,
                                        lambda key: self.l1.peek(key) is not None)

    async def load(self, variant: ModelVariant) -> LoadedModel:
        with telemetry.child_span(_tracer, "cache.lookup") as span:
            loaded = self.l1.get(variant.key)
            if span.is_recording():
                span.set_attributes({"cnei.model": variant.key, "cnei.cache.hit": loaded is not None})
        if loaded is not None:
            return loaded
        async with self._load_locks.hold(variant.key):
            loaded = self.l1.get(variant.key)
            if loaded is None and variant.key in self.deleted:
                raise ModelNotFound(variant.name, variant.version, variant.precision)
            if loaded is None:
                loaded = await self._load_uncached(variant)
        return loaded

    async def _load_uncached(self, variant: ModelVariant) -> LoadedModel:
        with _tracer.start_as_current_span("model.load") as span:
            span.set_attribute("cnei.model", variant.key)
            start = time.perf_counter()
            # pinned until it is in memory (measuring takes a while): a pull making room meanwhile
            # must not delete the artifact of a model about to be served
            async with self.sync.held_artifact(variant):
                rss_before = rss_bytes()
                model = await self._open_cached(variant)
                self.disk.touch(variant.sha256)
                model.run = slowed(model.run, self.settings.emulated_slowdown)
                meter = choose_meter(self.settings.energy_source, model.provider, self._cpu_energy, self._nvml)
                loaded = LoadedModel(variant, model, time.perf_counter() - start, meter)
                if self.settings.measure_on_load and await self._measure(loaded, rss_before) \
                        and self.settings.measure_siblings:
                    self.siblings.schedule(variant, model.intra_op_threads)
                for old, evicted in self.l1.put(variant.key, loaded, variant.size_bytes).items():
                    log.info("evicted %s from the L1 cache", old)
                    self._retire(old)
                    self.sync.left_memory(evicted.variant)
            span.set_attribute("cnei.intra_op_threads", model.intra_op_threads)
            log.info("loaded %s on %s (%d intra-op thread(s)) in %.3fs", variant.key, model.provider,
                     model.intra_op_threads, loaded.load_seconds)
            return loaded

    async def _measure(self, loaded: LoadedModel, rss_before: int) -> bool:
        """The loaded variant's batch-1 latency and memory, reported to the registry. It is run on
        zero-filled inputs, which a model may refuse (an index out of range, a zero it divides
        by): then it is served unmeasured (False), as the requests' own inputs decide whether it runs."""
        variant = loaded.variant
        try:
            latency, memory = await asyncio.get_running_loop().run_in_executor(
                self._executor, measure_variant, loaded.model, variant, rss_before)
        except CneiError as exc:
            log.warning("%s loaded unmeasured: it refuses the zero-filled inputs it is measured with (%s)",
                        variant.key, exc.message)
            return False
        loaded.compute_us = latency * 1e3
        self.background.spawn(self.report(variant, latency, memory))
        return True

    async def _open_cached(self, variant: ModelVariant) -> OrtModel:
        """The variant's session from its cached artifact. An artifact ONNX Runtime cannot load
        whose bytes no longer hash to its sha256 (bit rot, a truncated copy) is deleted and pulled
        again, once; one whose bytes are intact and still does not load is a clear INTERNAL error."""
        loop, path = asyncio.get_running_loop(), self.disk.artifact_path(variant.sha256)
        try:
            return await loop.run_in_executor(self._executor, self._open, path, variant)
        except Exception as exc:  # noqa: BLE001 - whatever ORT raises, the bytes are checked
            failure = exc
        async with self.sync.pull_locks.hold(variant.sha256):  # variants sharing the bytes repair them once
            if not await asyncio.to_thread(self.disk.intact, variant.sha256):  # (intact: maybe repaired meanwhile)
                await self._repull(variant, failure)
        try:
            return await loop.run_in_executor(self._executor, self._open, path, variant)
        except Exception as exc:  # noqa: BLE001
            raise CneiError(f"model '{variant.name}' version {variant.version} ({variant.precision}): ONNX "
                            f"Runtime cannot load its artifact sha256:{variant.sha256}, whose bytes are as "
                            f"the registry published them: {exc}", ErrorCode.INTERNAL) from exc

    async def _repull(self, variant: ModelVariant, failure: Exception) -> None:
        """Replace the variant's corrupt cached artifact with the registry's (its pull lock held)."""
        log.warning("cached artifact of %s does not hash to its sha256 (ONNX Runtime: %s): deleting it and "
                    "pulling it again", variant.key, failure)
        self.disk.discard(variant.sha256)
        try:
            await self.sync.pull(variant)
        except CneiError as exc:
            raise error_for(exc.code, f"the cached artifact of model '{variant.name}' version {variant.version} "
                                      f"was corrupt and was deleted; pulling it again failed: {exc.message}") from exc

    def _open(self, path: Path, variant: ModelVariant) -> OrtModel:
        """The variant's session (blocking): with the configured intra-op threads, or tuned."""
        if self.settings.intra_op_threads > 0:
            return OrtModel(path, self.settings.use_cuda, self.settings.intra_op_threads)
        return tuned_model(path, self.settings.use_cuda, sample_inputs(variant, TUNE_BATCH), available_cores(),
                           label=variant.key)

    async def report(self, variant: ModelVariant, latency_ms: float, memory_bytes: int) -> None:
        """Record what was measured of the variant here with the registry (advisory: a failure is logged)."""
        try:
            await self.registry.record_measurement(variant, self.settings.measured_class,
                                                   self.settings.node_id, latency_ms, memory_bytes)
            self.resolver.forget_resolutions(variant.name)
            log.info("measured %s on %s: %.3f ms, %d bytes", variant.key,
                     self.settings.measured_class, latency_ms, memory_bytes)
        except Exception as exc:  # noqa: BLE001 - measurements are advisory
            log.warning("could not record measurement of %s: %s", variant.key, exc)

    def unload(self, key: str) -> bool:
        """Take the variant out of memory; False when it was not there."""
        self._retire(key)
        removed = self.l1.remove(key)
        if removed is not None:
            self.sync.left_memory(removed.variant)
        return removed is not None
