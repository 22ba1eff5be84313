"""Coordinator core: serve a request (a model's, an ensemble's, joint inference) over the mesh's
nodes, through its collaborators: Placer (node and variant), NodeBatchers (a batcher per variant
and node), Attempts (failover, hedging), Escalation (joint inference), StepResolver (ensembles)."""
from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping

import numpy as np
from prometheus_client import Counter

from services.common import events, oip
from services.common.background import Background
from services.common.deployment import JOINT_MODES, DeploymentSpec, rollout_version, serving_tiers
from services.common.errors import (CneiError, ErrorCode, FailedPrecondition, InvalidArgument, ModelNotFound,
                                    Unavailable, outcome_of)
from services.common.model_spec import ModelVariant, check_batch_size, served_max_batch_size, version_key
from services.common.nodes import NodeInfo
from services.common.stats import ModelStats, StatsBook
from services.coordinator import ensemble
from services.coordinator.attempts import Attempts, queued_ns
from services.coordinator.breaker import Breakers
from services.coordinator.catalog import Catalog
from services.coordinator.escalation import EDGE_CACHED, Escalation
from services.coordinator.latency import LatencyBook
from services.coordinator.node_batchers import NodeBatchers
from services.coordinator.nodes_view import NodesView
from services.coordinator.placement import Scheduler
from services.coordinator.placer import Placement, Placer, restrict_tier, variants_by_class
from services.coordinator.precision import request_policy
from services.coordinator.response_cache import ResponseCache, from_cache
from services.coordinator.settings import CoordinatorSettings
from services.coordinator.stats_share import StatsShare
from services.coordinator.step_resolver import StepResolver

log = logging.getLogger(__name__)
Publisher = Callable[[str, dict], Awaitable[object]]
SERVED = Counter("cnei_coordinator_requests_total",
                 "Requests the front door answered, by the variant and node that served them and outcome",
                 ["model", "version", "precision", "node", "tier", "outcome"])
_served = functools.lru_cache(maxsize=None)(SERVED.labels)  # children looked up once


def count_served(model: str, outcome: str, params: dict | None = None, requests: int = 1) -> None:
    """Answered requests under the variant and node they came from."""
    p = params or {}
    _served(model, str(p.get("cnei_version", "")), str(p.get("cnei_precision", "")),
            str(p.get("cnei_node", "")), str(p.get("cnei_tier", "")), outcome).inc(requests)


class Coordinator:
    """The coordinator's InferenceCore (OIP servicer, REST, front door) and what it tells them of
    placement, breakers and load; it wires its collaborators around one set of books."""

    server_name = "cnei-coordinator"
    server_version = "0.1.0"

    def __init__(self, settings: CoordinatorSettings, catalog: Catalog, nodes: NodesView,
                 scheduler: Scheduler | None = None, publish: Publisher | None = None):
        self.settings = settings
        self.catalog = catalog
        self.nodes = nodes
        self.stats = StatsBook()
        self.stats_view: StatsBook | StatsShare = self.stats  # what statistics requests read
        self.outstanding: dict[str, int] = {}  # rows this process has queued for each node or sent it
        self._background = Background()
        self.node_batchers = NodeBatchers(nodes, self.stats, settings.fast_lane, self._background)
        self.batchers = self.node_batchers.batchers  # by (variant key, node id)
        self.publish = publish
        self.breakers = Breakers(settings.breaker_failures, settings.breaker_open_s)
        self.placer = Placer(nodes, self.breakers, scheduler or Scheduler(), self.outstanding, settings.door_report_ms)
        self.latency = LatencyBook()
        self.recent: deque[dict] = deque(maxlen=100)
        self.escalation = Escalation(settings, lambda: self.catalog, nodes, self.placer, self._infer,
                                     self.recent, self._background, self.announce, lambda: self.control)
        self.attempts = Attempts(settings, self.placer, self.breakers, self.node_batchers, self.outstanding,
                                 self.latency, self.recent, self._background, self.announce)
        self.control = None  # repository.ModelControl: models unloaded through the repository API
        # Called with the model's name once a load or unload through this coordinator took effect,
        # before it is answered (the front door's routes of the model are dropped: DoorRoutes)
        self.after_repository_change: Callable[[str], Awaitable[object]] | None = None
        # Called with a node's id once it left the view (the front door's routes to it are dropped)
        self.after_node_left: Callable[[str], None] | None = None
        self.cache = ResponseCache(settings.response_cache_bytes)

    # --- InferenceCore ----------------------------------------------------------------------
    async def ready(self) -> bool:
        return bool(self.nodes.nodes)

    async def model_ready(self, name: str, version: str) -> bool:
        """Triton's ModelReady: the model (an ensemble: its steps' models too, through nested
        ensembles) is known, not unloaded, and the mesh has nodes."""
        try:
            await self.model_variant(name, version)  # an ensemble's: its steps', a cycle refused
            await self._check_in_service(name)
        except CneiError:
            return False
        return bool(self.nodes.nodes)

    async def _check_in_service(self, name: str) -> None:
        """UNAVAILABLE when `name`, or a model an ensemble of that name runs, was unloaded."""
        if self.control is not None:
            await self.control.check(name)
        for step in (await self.catalog.deployment(name)).ensemble:
            await self._check_in_service(step.model)

    async def model_variant(self, name: str, version: str = "", depth: int = 0) -> ModelVariant:
        """The model's default variant; for an ensemble, what its steps make of it (`depth`: how
        many ensembles lead to this one; FAILED_PRECONDITION past ensemble.MAX_DEPTH, a cycle)."""
        return await StepResolver(self.catalog).model_variant(name, version, depth)

    async def deployment(self, name: str) -> DeploymentSpec:
        """The model's deployment (what ModelConfig shows of it)."""
        return await self.catalog.deployment(name)

    def instance(self, variant: ModelVariant) -> None:
        return None  # the coordinator runs no model; its nodes' configs say how they run theirs

    async def model_versions(self, name: str) -> list[str]:
        variants = await self.catalog.all_variants(name)
        if not variants and (await self.catalog.deployment(name)).ensemble:
            return [ensemble.VERSION]
        if not variants:
            raise CneiError(f"model '{name}' not found", ErrorCode.NOT_FOUND)
        return sorted({v.version for v in variants}, key=version_key)

    async def repository_index(self) -> list[ModelVariant]:
        """Every registered variant, and each ensemble."""
        variants = await self.catalog.registry.list()
        steps = StepResolver(self.catalog)
        for spec in await self.catalog.registry.list_deployments():
            if spec.ensemble:
                try:
                    variants.append(await steps.ensemble_variant(spec, 0))
                except CneiError as exc:  # a step's model gone: the ensemble is listed, not ready
                    log.warning("ensemble %s: %s", spec.model, exc.message)
                    variants.append(ModelVariant(spec.model, ensemble.VERSION, "", "", 0, [], [], "ensemble"))
        return variants

    async def unloaded_models(self) -> frozenset[str]:
        return await self.control.unloaded() if self.control is not None else frozenset()

    async def load_model(self, name: str) -> None:
        await self._control().load(name)
        await self._repository_changed(name)

    async def unload_model(self, name: str) -> None:
        await self._control().unload(name)
        await self._repository_changed(name)

    async def _repository_changed(self, name: str) -> None:
        if self.after_repository_change is not None:
            await self.after_repository_change(name)

    def _control(self):
        if self.control is None:
            raise FailedPrecondition("this coordinator has no model control (no Redis)")
        return self.control

    def statistics(self, name: str, version: str) -> list[ModelStats]:
        return self.stats_view.select(name, version)

    def knows_model(self, name: str) -> bool:
        """Whether this process has worked out a version of `name` to serve (its statistics
        hold one): a name its metrics may carry as a label."""
        return bool(self.stats.select(name))

    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None,
                    steps: StepResolver | None = None) -> oip.InferResponse:
        """Serve a client's request, held to the max_batch_size ModelConfig shows (`_check_rows`),
        or with `steps` (its ensemble request's, whose reads it shares) an ensemble's step (the
        ensemble's rows, which the batcher sends alone when over the step's batches: an ensemble
        that serves them today keeps serving them). One that fails counts as a failure of the
        model version that served it, or was to (`_count_failure`)."""
        start = time.perf_counter_ns()
        served: list[ModelStats] = []  # the statistics of the version to serve it, once known
        try:
            return await self._infer_request(request, deadline_s, steps, start, served)
        except (Exception, asyncio.CancelledError) as exc:
            self._count_failure(request, exc, served, time.perf_counter_ns() - start)
            raise

    def _count_failure(self, request: oip.InferRequest, exc: BaseException, served: list[ModelStats],
                       ns: int) -> None:
        """Triton's request_failure (a request its client cancelled included): in the version
        worked out to serve the request, or, when it failed before that (the registry away, the
        model unloaded), the version it names or that such requests last went to
        (`StatsBook.failed`). An unknown model or version counts nowhere."""
        if served:
            served[-1].record(False, ns)
        elif outcome_of(exc) != "not_found":
            self.request_failed(request.model_name, request.model_version, ns)

    def request_failed(self, name: str, version: str, ns: int) -> None:
        """A request for the model an adapter refused before it reached `infer` (malformed)."""
        stats = self.stats.failed(name, version)
        if stats is not None:
            stats.record(False, ns)

    async def _infer_request(self, request: oip.InferRequest, deadline_s: float | None,
                             steps: StepResolver | None, start: int, served: list[ModelStats]) -> oip.InferResponse:
        if self.control is not None:
            await self.control.check(request.model_name)
        catalog = self.catalog if steps is None else steps  # a step reads through its ensemble's
        deployed = await catalog.deployment(request.model_name)
        if deployed.ensemble:
            if request.model_version not in ("", ensemble.VERSION):
                raise ModelNotFound(request.model_name, request.model_version)
            served.append(self.stats.get(deployed.model, ensemble.VERSION, by_default=not request.model_version))
            if steps is None:  # a client's request (a step's carries its step's tier and precision)
                ensemble.check_parameters(deployed, request.parameters)
                steps = StepResolver(self.catalog)
                depth = ensemble.nesting_depth(request.parameters)
                self._check_rows(request, deployed, await steps.ensemble_variant(deployed, depth))
            return await self._ensemble(request, deployed, deadline_s, start, steps, served[0])
        # a request that names no version: the canary's share goes to the canary, the rest to the
        # stable version (the catalog's default)
        version = request.model_version or rollout_version(deployed.rollout, random.random())
        variants = await catalog.variants(request.model_name, version)
        stats = self.stats.get(variants[0].name, variants[0].version, by_default=not version)
        served.append(stats)
        if steps is None:
            self._check_rows(request, deployed, variants[0])
        spec = restrict_tier(deployed, request.parameters)
        mode = str(request.parameters.get("joint", "") or spec.joint.mode)
        if mode not in JOINT_MODES:
            raise InvalidArgument(f"parameter 'joint' must be one of {list(JOINT_MODES)}, got {mode!r}")
        queued: list[int] = []
        token = queued_ns.set(queued)
        try:
            if mode == "off":
                response = await self._infer(request, variants, spec, deadline_s)
            else:
                response = await self.escalation.joint(request, variants, spec, mode, deadline_s)
        except Exception as exc:
            count_served(variants[0].name, outcome_of(exc))
            raise
        finally:
            queued_ns.reset(token)
        # its executions are the batches it rode in, booked as the node ran them (`NodeBatchers`)
        total = time.perf_counter_ns() - start  # hedged copies queue at once: their sum may exceed it
        # rows a model ran for it: all of them, none for a kept answer, only those the cloud
        # answered again when the edge's answer was kept
        ran = int(response.parameters.get("cnei_escalated", 0)) if EDGE_CACHED in response.parameters \
            else request.rows
        stats.record(True, total, ran, queue_ns=min(sum(queued), total), executed=False,
                     cache_hit=from_cache(response))
        count_served(variants[0].name, "ok", response.parameters)
        return response

    @staticmethod
    def _check_rows(request: oip.InferRequest, deployed: DeploymentSpec, variant: ModelVariant) -> None:
        """Triton's batch-size check of a client's request against the max_batch_size ModelConfig
        shows for the model (`variant`'s capped by its deployment; an ensemble's from its steps'
        models), the door's requests over it included (it forwards them): INVALID_ARGUMENT."""
        # the model's own inputs: one it lacks is refused by name when the request is checked
        inputs = {t.name: request.inputs[t.name] for t in variant.inputs if t.name in request.inputs}
        check_batch_size(request.model_name, inputs, served_max_batch_size(variant, deployed))

    async def _ensemble(self, request: oip.InferRequest, spec: DeploymentSpec, deadline_s: float | None,
                        start: int, steps: StepResolver, stats: ModelStats) -> oip.InferResponse:
        depth = ensemble.nesting_depth(request.parameters)
        run = functools.partial(ensemble.run, spec, request, deadline_s, functools.partial(self.infer, steps=steps),
                                functools.partial(steps.model_variant, depth=depth + 1), steps.drawn_version)
        # Triton's top-level ensemble caching
        cached = spec.response_cache and self.cache.max_bytes
        scope = await steps.cache_scope(spec, depth) if cached else None
        if scope is not None:
            response = await self.cache.answer(scope, request, spec.model, stats, run)
        else:
            response = await run()
        stats.record(True, time.perf_counter_ns() - start, request.rows, executed=False,
                     cache_hit=from_cache(response))
        return response

    # --- placement (Placer) ------------------------------------------------------------------
    def door_reported(self, rows: dict[str, int], now: float) -> None:
        """The front door's rows at each node, as its report at `now` (monotonic) says them."""
        self.placer.door_reported(rows, now)

    @property
    def door_rows_at(self) -> float | None:
        """When the front door's last report of its rows came (monotonic)."""
        return self.placer.door_rows_at

    @door_rows_at.setter
    def door_rows_at(self, now: float | None) -> None:
        self.placer.door_rows_at = now

    @property
    def door_rows_max_age_s(self) -> float:
        return self.placer.door_rows_max_age_s

    def rows_outstanding(self) -> Mapping[str, int]:
        """Rows outstanding per node as placement weighs them (`Placer.rows_outstanding`)."""
        return self.placer.rows_outstanding()

    def place_spread(self, request: oip.InferRequest, variants: list[ModelVariant], spec: DeploymentSpec,
                     limit: int, margin: float) -> list[Placement]:
        """Where requests like this one may go, the full path's first choice first (`Placer.place_spread`)."""
        return self.placer.place_spread(request, variants, spec, limit, margin)

    def eligible_nodes(self, spec: DeploymentSpec) -> list[NodeInfo]:
        """Live nodes of the deployment's tiers whose circuit breaker lets calls through."""
        return self.placer.eligible_nodes(spec)

    def out_of_use(self, spec: DeploymentSpec, region: str = "", models: Collection[str] = ()) -> dict[str, str]:
        """Live nodes of the deployment's tiers no call may go to now, with why (`Placer.out_of_use`)."""
        return self.placer.out_of_use(spec, region, models)

    def answer_template(self, model: str, placement: Placement) -> oip.InferResponse:
        """The response a request for `model` served by `placement` carries, without outputs."""
        return self._response(oip.InferRequest(model, {}), placement, {})

    async def _infer(self, request: oip.InferRequest, variants: list[ModelVariant],
                     spec: DeploymentSpec, deadline_s: float | None) -> oip.InferResponse:
        """Serve `request`; with the deployment's response cache, from the answers kept when it
        was answered before in the same scope (`cache_scope`) for the same inputs."""
        serve = functools.partial(self._serve, request, variants, spec, deadline_s)
        if not spec.response_cache or not self.cache.max_bytes:
            return await serve()
        v = variants[0]
        return await self.cache.answer(self.cache_scope(request, variants, spec), request, v.name,
                                       self.stats.get(v.name, v.version), serve)

    def cache_scope(self, request: oip.InferRequest, variants: list[ModelVariant], spec: DeploymentSpec) -> str:
        """What decides a request's answer besides its inputs: the version, the precision policy,
        the tiers it may run on (`spec` as its `tier` parameter narrowed it: an edge-only request
        never gets an answer the cloud computed) and the variant the policy chooses on each node
        class of those tiers now (a latency budget may choose INT8 on the edge and FP32 in the
        cloud; new measurements may change the choice)."""
        v, policy = variants[0], request_policy(request.parameters, spec)
        tiers = serving_tiers(spec)
        choices = variants_by_class(variants, policy, [n for n in self.nodes.nodes if n.tier in tiers])
        chosen = sorted(f"{cls}={c.key}" for cls, c in choices.items() if isinstance(c, ModelVariant))
        return f"{v.name}/{v.version}/{policy}/{sorted(tiers)}/{chosen}"

    async def _serve(self, request: oip.InferRequest, variants: list[ModelVariant],
                     spec: DeploymentSpec, deadline_s: float | None) -> oip.InferResponse:
        outputs, placement = await self.attempts.serve(request, variants, spec, deadline_s)
        return self._response(request, placement, outputs)

    def probe(self, request: oip.InferRequest, placement: Placement, spec: DeploymentSpec) -> bool:
        """Send `request` to the placement's node as the half-open probe of its breaker, when one
        may go now (`Attempts.probe`); False when no probe went."""
        return self.attempts.probe(request, placement, spec)

    def node_changed(self, subject: str, node: NodeInfo, reason: str) -> None:
        """Node up/down seen by the coordinator (heartbeat expiry, failed health check)."""
        # left: the view no longer holds this node id at these addresses (it may hold the id back
        # at others: a pod restarted elsewhere, whose batchers must not keep the old addresses)
        if subject == events.NODE_DOWN and not any(n.place == node.place for n in self.nodes.nodes):
            self._node_left(node)
        elif subject == events.NODE_DOWN:
            self.breakers.get(node.node_id).trip(reason)
        else:
            self.breakers.get(node.node_id).success()
        self.recent.append({"kind": subject.rsplit(".", 1)[-1], "time": time.time(),
                            "node": node.node_id, "reason": reason})
        if self.settings.worker_index > 0:
            return  # of several workers, worker 0 alone announces what they all see
        self._background.spawn(self.announce(subject, {"node_id": node.node_id, "tier": node.tier,
                                            "region": node.region, "reason": reason,
                                            "observer": "coordinator"}))

    def _node_left(self, node: NodeInfo) -> None:
        """A node left the view: its batchers stop (requests queued there fail over, batches in
        flight end), its breakers, load and latencies are forgotten, and `after_node_left` is
        told (the front door stops sending there)."""
        self.node_batchers.drop_node(node.node_id, Unavailable(f"node {node.node_id} left the mesh"))
        self.breakers.drop(node.node_id)
        self.outstanding.pop(node.node_id, None)
        self.latency.drop_node(node.node_id)
        if self.after_node_left is not None:
            self.after_node_left(node.node_id)

    async def announce(self, subject: str, payload: dict,
                       smaller: Callable[[events.EventRefused], dict] | None = None) -> None:
        """Publish `payload`, best effort (a failure is logged); one the bus refuses outright (too
        big) goes again as `smaller` makes it of the refusal, when given."""
        if self.publish is None:
            return
        try:
            await self.publish(subject, payload)
        except Exception as exc:  # noqa: BLE001 - the metric and span still record it
            if smaller is not None and isinstance(exc, events.EventRefused):
                await self.announce(subject, smaller(exc))
            else:
                log.warning("could not publish %s: %s", subject, exc)

    def _response(self, request: oip.InferRequest, placement: Placement,
                  outputs: dict[str, np.ndarray]) -> oip.InferResponse:
        if request.outputs:
            outputs = {name: outputs[name] for name in request.outputs if name in outputs}
        v, node = placement.variant, placement.node
        parameters = {"cnei_node": node.node_id, "cnei_tier": node.tier,
                      "cnei_precision": v.precision, "cnei_version": v.version}
        if self.settings.worker_index >= 0:
            parameters["cnei_coordinator_worker"] = self.settings.worker_index
        return oip.InferResponse(model_name=v.name, model_version=v.version, id=request.id,
                                 outputs=outputs, parameters=parameters)

    async def close(self) -> None:
        """Serve what is queued, then stop every batcher."""
        await asyncio.gather(*(b.drain_and_close(5.0) for b in self.batchers.values()),
                             self._background.wait(), return_exceptions=True)
