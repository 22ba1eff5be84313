"""Runtime core: a runtime's parts wired together (resolution, disk sync, loading, execution), the
request path over them, and keeping up with the registry (its events, and a resync when back)."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace

from services.common import oip
from services.common.background import Background
from services.common.batcher import priority_level, request_deadline
from services.common.deployment import DeploymentSpec
from services.common.errors import CneiError, ErrorCode, outcome_of
from services.common.model_spec import (FORMED_BATCH, ModelVariant, Tombstone, check_batch_size, check_inputs,
                                        served_max_batch_size, version_key)
from services.common.oip_operations import Instance
from services.common.registry_client import RegistryClient
from services.common.stats import ModelStats, StatsBook
from services.edge_runtime import accounting
from services.edge_runtime.accounting import REQUESTS, CostModel
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.disk_sync import DiskSync
from services.edge_runtime.energy import check_source
from services.edge_runtime.execution import (Execution, Run, batch_size, batching_spec, check_batching,
                                             requested_outputs, run_labels)
from services.edge_runtime.l1 import L1Cache
from services.edge_runtime.loading import LoadedModel, Loader
from services.edge_runtime.reach import RegistryReach, unreachable
from services.edge_runtime.resolution import Resolver
from services.edge_runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)
RESYNC_RETRIES = 20
DEFAULT_DEADLINE_S = 300.0  # a queued request with no gRPC deadline or timeout_us


class EdgeRuntime:
    """The InferenceCore an edge node serves, over its resolver, disk sync, loader and execution."""

    server_name = "cnei-edge-runtime"
    server_version = "0.1.0"

    def __init__(self, settings: RuntimeSettings, registry: RegistryClient, disk: DiskCache):
        self.settings = settings
        self._registry = registry
        self.disk = disk
        self.l1 = L1Cache(settings.cache_max_bytes)
        self.stats = StatsBook()
        self.inflight = 0
        self.arrivals = 0  # requests ever taken (a sibling measurement is made again when one comes meanwhile)
        self._executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="ort")
        self.background = Background()
        self.cost_model = CostModel(settings.cost_per_cpu_second, settings.cost_per_network_mb)
        check_source(settings.energy_source)  # a bad setting stops the runtime at start
        check_batching(settings)
        self._reach = RegistryReach()
        self._resync_lock = asyncio.Lock()
        self.execution = Execution(settings, self.l1, self.stats, self.cost_model, self._executor, self.background)
        self.batchers = self.execution.batchers
        # variant keys deleted from the registry: never loaded again unless the registry resolves
        # them again (the same name, version and precision pushed after the deletion)
        self._deleted: set[str] = set()
        self.resolver = Resolver(registry, disk, self.l1, self._reach, self._deleted, self.background)
        self.sync = DiskSync(registry, disk, self.l1, self._reach, self._deleted, self.resolver, self.background)
        self.loader = Loader(settings, registry, self.sync, self.resolver, self._executor, self.background,
                             lambda: (self.inflight, self.arrivals), self.execution.retire)
        self.siblings = self.loader.siblings

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Stop measuring siblings; serve what the batchers hold, then stop them (before `close`)."""
        await self.siblings.stop()
        await self.execution.drain(timeout_s)

    def close(self) -> None:
        self.siblings.close()
        self._executor.shutdown(wait=True, cancel_futures=False)

    # --- the registry's models, and what it announces ---------------------------------------
    @property
    def registry(self) -> RegistryClient:
        return self._registry

    @registry.setter
    def registry(self, client: RegistryClient) -> None:
        """The registry this runtime asks (replaced: each of its parts asks the new one)."""
        self._registry = client
        self.resolver.registry = self.sync.registry = self.loader.registry = self.loader.siblings.registry = client

    async def deployment_cap(self, name: str) -> int:
        """The most rows one call of the model may carry by its deployment (`Resolver.deployment_cap`)."""
        return await self.resolver.deployment_cap(name)

    def deployment_updated(self, name: str) -> None:
        """The model's deployment (or its versions) changed: ask for its cap again at its next
        request, and for the versions in use at the next pull."""
        self.resolver.forget_deployment(name)
        self.sync.versions_in_use_changed()

    def forget_resolutions(self, name: str = "") -> None:
        """Drop cached resolutions (all, or one model's) so the next request asks the registry."""
        self.resolver.forget_resolutions(name)

    async def resolve(self, name: str, version: str = "", precision: str = "") -> ModelVariant:
        """The variant a request names (`Resolver.resolve`: the registry's, or the disk cache's offline)."""
        return await self.resolver.resolve(name, version, precision)

    async def model_published(self, name: str) -> None:
        """A new version (or variant) exists: forget resolutions and the version the model's
        deployment serves (it may be the latest now), and refresh the model where this node caches it."""
        self.forget_resolutions(name)
        await self.model_deployed(name)

    async def model_deleted(self, name: str, version: str, precisions: list[str], sha256: str = "") -> None:
        """A version (or some of its variants) was deleted from the registry (`DiskSync.model_deleted`)."""
        await self.sync.model_deleted(name, version, precisions, sha256)

    async def forget_deleted(self, names: tuple[str, ...] = ()) -> bool:
        """Forget what was deleted while its events did not reach this node (`DiskSync.forget_deleted`)."""
        return await self.sync.forget_deleted(names)

    async def apply_tombstones(self, tombstones: list[Tombstone]) -> list[str]:
        """Forget the variants these tombstones name (`DiskSync.apply_tombstones`): the keys forgotten."""
        return await self.sync.apply_tombstones(tombstones)

    async def model_deployed(self, name: str) -> None:
        """The model's deployment changed (a version promoted, a canary set): forget its cap, and
        refresh the model where this node caches it."""
        self.deployment_updated(name)
        if any(v.name == name for v in self.disk.variants()):
            await self.resync(names=(name,))

    async def resync(self, attempt: int = 0, names: tuple[str, ...] = ()) -> None:
        """Back online (or told of a new version or deployment): for every cached model (or those
        `names`), forget the variants deleted meanwhile (`forget_deleted`), pull the versions its
        deployment serves in each cached precision, and load its stable version where another
        version of that precision is loaded (`_refresh`)."""
        async with self._resync_lock:
            self._reach.back()
            if names:
                for name in names:
                    self.forget_resolutions(name)
                    self.resolver.forget_deployment(name)
            else:
                self.forget_resolutions()
                self.resolver.forget_deployment()  # deployments may have changed while the events did not arrive
                self.sync.versions_in_use_changed()
            retry = not await self.forget_deleted(names)  # deletions whose events did not arrive
            loaded = {(m.variant.name, m.variant.precision) for m in self.l1.values()}
            cached: dict[str, set[str]] = {}
            for v in self.disk.variants():
                if not names or v.name in names:
                    cached.setdefault(v.name, set()).add(v.precision)
            for name, precisions in sorted(cached.items()):
                retry = not await self._refresh(name, precisions, loaded) or retry
        if retry and attempt < RESYNC_RETRIES:
            await asyncio.sleep(1.0)
            self.background.spawn(self.resync(attempt + 1, names))

    async def _refresh(self, name: str, precisions: set[str], loaded: set[tuple[str, str]]) -> bool:
        """Pull what the model's deployment serves (its stable version, pinned or the latest, and
        a canary) in `precisions`, loading the stable one where the model is `loaded` in that
        precision: a version pushed but not released (or still lacking a precision the deployment
        needs) is neither pulled nor loaded. False when the registry was unreachable (try again)."""
        try:
            spec, stable = await self.resolver.read_deployment(name)
        except CneiError as exc:
            log.warning("resync of %s failed: %s", name, exc)
            return not unreachable(exc)
        canary = spec.rollout.canary if spec else ""
        served = [stable] + ([canary] if canary else [])
        reachable = True
        for precision in sorted(precisions):
            for version in served:
                try:
                    variant = await self._resolve_published(name, version, precision)
                    if variant is None:
                        continue
                    if await self.sync.ensure_on_disk(variant):
                        log.info("pulled %s (deployed, missed)", variant.key)
                    if version == stable and (name, precision) in loaded:
                        await self.load(variant)
                except CneiError as exc:
                    log.warning("resync of %s v%s %s failed: %s", name, version or "latest", precision, exc)
                    reachable = reachable and not unreachable(exc)
        return reachable

    async def _resolve_published(self, name: str, version: str, precision: str) -> ModelVariant | None:
        """A served version's variant in `precision` for a resync; None (logged at INFO) when the
        registry has that version not in that precision: a version's precisions are published one
        after another (its FP32 first), so it is pulled when it is."""
        try:
            return await self.registry.resolve(name, version, precision)
        except CneiError as exc:
            if exc.code != ErrorCode.NOT_FOUND or not version:
                raise
            log.info("resync of %s v%s %s: not published yet, pulled when it is (%s)", name, version, precision, exc)
            return None

    async def load(self, variant: ModelVariant) -> LoadedModel:
        """The variant in memory, loaded first where it is not (`Loader.load`)."""
        return await self.loader.load(variant)

    def unload(self, key: str) -> bool:
        """Take the variant out of memory; False when it was not there."""
        return self.loader.unload(key)

    def loaded(self) -> list[LoadedModel]:
        return self.l1.values()

    # --- InferenceCore ----------------------------------------------------------------------
    async def ready(self) -> bool:
        return True

    async def model_ready(self, name: str, version: str) -> bool:
        try:
            await self.resolve(name, version)
        except CneiError:
            return False
        return True

    async def model_variant(self, name: str, version: str = "") -> ModelVariant:
        return await self.resolve(name, version)

    async def model_versions(self, name: str) -> list[str]:
        try:
            variants = await self.registry.list(name)
        except CneiError:
            variants = [v for v in self.disk.variants() if v.name == name]
        return sorted({v.version for v in variants}, key=version_key)

    async def repository_index(self) -> list[ModelVariant]:
        try:
            return await self.registry.list()
        except CneiError:
            return self.disk.variants()

    async def deployment(self, name: str) -> DeploymentSpec | None:
        """What ModelConfig shows of how this runtime batches the model: its own batching
        settings (deployments themselves are the coordinator's; the runtime only keeps within
        their batch size, `deployment_cap`)."""
        return DeploymentSpec(model=name, batching=batching_spec(self.settings)) if self.settings.batching else None

    def instance(self, variant: ModelVariant) -> Instance | None:
        """How the variant runs here, when it is loaded (nothing is loaded to answer this)."""
        loaded = self.l1.peek(variant.key)
        if loaded is None:
            return None
        return Instance(gpu=loaded.model.provider == "CUDAExecutionProvider",
                        intra_op_threads=loaded.model.intra_op_threads)

    async def unloaded_models(self) -> frozenset[str]:
        return frozenset()  # a runtime serves every model it can pull; the coordinator takes models out of service

    async def load_model(self, name: str) -> None:
        """Load the variant the registry resolves for the model by default into memory now."""
        await self.load(await self.resolve(name))

    async def unload_model(self, name: str) -> None:
        """Drop every variant of the model from memory (a later request loads it again)."""
        await self.resolve(name)  # NOT_FOUND for a model the registry and disk cache lack
        for m in self.loaded():
            if m.variant.name == name:
                self.unload(m.variant.key)

    def statistics(self, name: str, version: str) -> list[ModelStats]:
        return self.stats.select(name, version)

    def knows_model(self, name: str) -> bool:
        """Whether this runtime has resolved a version of `name` (its statistics hold one): a
        name its metrics may carry as a label."""
        return bool(self.stats.select(name))

    def request_failed(self, name: str, version: str, ns: int) -> None:
        """A request for the model that failed before its variant was resolved (the registry and
        disk cache without it, malformed): a failure of the version it names or that such
        requests last went to, when this runtime served it before (`StatsBook.failed`)."""
        stats = self.stats.failed(name, version)
        if stats is not None:
            stats.record(False, ns)

    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None) -> oip.InferResponse:
        start = time.perf_counter_ns()
        precision = str(request.parameters.get("precision", "") or "")
        try:
            variant = await self.resolve(request.model_name, request.model_version, precision)
        except (Exception, asyncio.CancelledError) as exc:  # cancelled: its client gave up
            if outcome_of(exc) != "not_found":  # an unknown model or version counts nowhere
                self.request_failed(request.model_name, request.model_version, time.perf_counter_ns() - start)
            raise
        stats = self.stats.get(variant.name, variant.version, by_default=not request.model_version)
        labels = run_labels(variant, self.settings)
        self.inflight += 1
        self.arrivals += 1
        try:
            loaded = await self.load(variant)
            check_inputs(variant, request.inputs)
            await self._check_rows(variant, request)
            outputs = requested_outputs(variant, request.outputs)
            batch = batch_size(variant, request)
            priority = priority_level(request.parameters)
            deadline = request_deadline(request.parameters, deadline_s, DEFAULT_DEADLINE_S)
            submitted = time.perf_counter_ns()
            batcher = (self.execution.batcher(loaded, outputs, await self.deployment_cap(variant.name))
                       if self.execution.batches(loaded) else None)
            if batcher is not None:
                result = await batcher.submit(request.inputs, priority, deadline)
            else:
                result = await self.execution.execute(loaded, request.inputs, outputs, batch)
            run: Run = result.info
        except (Exception, asyncio.CancelledError) as exc:  # cancelled: its client gave up
            stats.record(False, time.perf_counter_ns() - start)
            REQUESTS.labels(*labels.values(), outcome_of(exc)).inc()
            raise
        finally:
            self.inflight -= 1
        queue_ns = max(0, run.started_ns - submitted)
        stats.record(True, time.perf_counter_ns() - start, batch, queue_ns=queue_ns, executed=False)
        accounting.record_request(labels, queue_ns / 1e9, loaded.meter.source)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({
                "cnei.model": variant.name, "cnei.version": variant.version,
                "cnei.precision": variant.precision, "cnei.node": self.settings.node_id,
                "cnei.batch_size": batch, "cnei.run_batch_size": run.rows,
            })
        return oip.InferResponse(
            model_name=variant.name, model_version=variant.version, id=request.id,
            outputs=dict(result),
            parameters={"cnei_node": self.settings.node_id, "cnei_precision": variant.precision,
                        "cnei_tier": self.settings.tier, "cnei_compute_us": run.compute_ns // 1000},
        )

    async def _check_rows(self, variant: ModelVariant, request: oip.InferRequest) -> None:
        """A client's request held to the max_batch_size this runtime's ModelConfig shows (its own
        batching's), as Triton does; a coordinator's batch (FORMED_BATCH) only to the model's own,
        which `check_inputs` judged: its deployment may batch more rows than this runtime merges."""
        if request.parameters.get(FORMED_BATCH) is not True:
            check_batch_size(variant.name, request.inputs,
                             served_max_batch_size(variant, await self.deployment(variant.name)))
