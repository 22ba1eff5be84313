"""Coordinator core: pick variant and node per request, batch per (variant, node), fail over."""
from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import replace

import numpy as np
from opentelemetry import trace
from prometheus_client import Counter

from services.common import events, oip
from services.common.background import Background
from services.common.deployment import JOINT_MODES, DeploymentSpec, rollout_version
from services.common.errors import (CneiError, DeadlineExceeded, ErrorCode, FailedPrecondition, InvalidArgument,
                                    ModelNotFound, NoLiveNode, Unavailable, outcome_of)
from services.common.model_spec import (ModelVariant, check_batch_size, check_outputs, served_max_batch_size,
                                        version_key)
from services.common.nodes import NodeInfo
from services.common.stats import ModelStats, StatsBook
from services.coordinator import ensemble
from services.common.batcher import request_deadline
from services.coordinator.response_cache import CACHED, ResponseCache, from_cache
from services.coordinator.attempts import RETRYABLE, Attempts, queued_ns
from services.coordinator.breaker import Breakers
from services.coordinator.catalog import Catalog
from services.coordinator.joint import (answered_outputs, disagreements, joint_scores, merge_rows, only,
                                       prefer_edge, rows_below)
from services.coordinator.latency import LatencyBook
from services.coordinator.node_batchers import NodeBatchers
from services.coordinator.nodes_view import NodesView
from services.coordinator.placement import Scheduler
from services.coordinator.placer import Placement, Placer, restrict_tier, serving_tiers, variants_by_class
from services.coordinator.precision import policy_from_params, request_policy
from services.coordinator.settings import CoordinatorSettings
from services.coordinator.stats_share import StatsShare
from services.coordinator.step_resolver import StepResolver

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
Publisher = Callable[[str, dict], Awaitable[object]]
ESCALATIONS = Counter("cnei_escalations_total", "Rows sent to the cloud model by joint inference",
                      ["model", "mode"])
DISAGREEMENTS = Counter("cnei_joint_disagreements_total", "Rows where edge and cloud disagreed (async)",
                        ["model"])
SERVED = Counter("cnei_coordinator_requests_total",
                 "Requests the front door answered, by the variant and node that served them and outcome",
                 ["model", "version", "precision", "node", "tier", "outcome"])
# response parameter: sync joint inference's edge answer came from the response cache, and the
# cloud answered its unsure rows again (so the answer as a whole is not a kept one)
EDGE_CACHED = "cnei_edge_response_cache"
ESCALATION_ERROR = "cnei_escalation_error"  # response parameter: why sync joint kept the edge answer
# Of what the edge left of a sync joint request's deadline, the share the cloud gets: the rest is
# kept to answer with the edge's rows after a cloud timeout, before the caller's deadline
ESCALATION_SHARE = 0.9
_served = functools.lru_cache(maxsize=None)(SERVED.labels)  # children looked up once


def count_served(model: str, outcome: str, params: dict | None = None, requests: int = 1) -> None:
    """Answered requests under the variant and node they came from."""
    p = params or {}
    _served(model, str(p.get("cnei_version", "")), str(p.get("cnei_precision", "")),
            str(p.get("cnei_node", "")), str(p.get("cnei_tier", "")), outcome).inc(requests)


class Coordinator:
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
        try:
            await self.model_variant(name, version)
            if self.control is not None:
                await self.control.check(name)
        except CneiError:
            return False
        return bool(self.nodes.nodes)

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

    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None,
                    step: bool = False) -> oip.InferResponse:
        """Serve a client's request, held to the max_batch_size ModelConfig shows (`_check_rows`),
        or with `step` an ensemble's step (the ensemble's rows, which the batcher sends alone when
        over the step's batches: an ensemble that serves them today keeps serving them)."""
        start = time.perf_counter_ns()
        if self.control is not None:
            await self.control.check(request.model_name)
        deployed = await self.catalog.deployment(request.model_name)
        if deployed.ensemble:
            if request.model_version not in ("", ensemble.VERSION):
                raise ModelNotFound(request.model_name, request.model_version)
            steps = StepResolver(self.catalog)
            if not step:
                depth = ensemble.nesting_depth(request.parameters)
                self._check_rows(request, deployed, await steps.ensemble_variant(deployed, depth))
            return await self._ensemble(request, deployed, deadline_s, start, steps)
        # a request that names no version: the canary's share goes to the canary, the rest to the
        # stable version (the catalog's default)
        version = request.model_version or rollout_version(deployed.rollout, random.random())
        variants = await self.catalog.variants(request.model_name, version)
        if not step:
            self._check_rows(request, deployed, variants[0])
        spec = restrict_tier(deployed, request.parameters)
        stats = self.stats.get(variants[0].name, variants[0].version)
        mode = str(request.parameters.get("joint", "") or spec.joint.mode)
        if mode not in JOINT_MODES:
            raise InvalidArgument(f"parameter 'joint' must be one of {list(JOINT_MODES)}, got {mode!r}")
        queued: list[int] = []
        token = queued_ns.set(queued)
        try:
            if mode == "off":
                response = await self._infer(request, variants, spec, deadline_s)
            else:
                response = await self._joint(request, variants, spec, mode, deadline_s)
        except Exception as exc:
            stats.record(False, time.perf_counter_ns() - start)
            count_served(variants[0].name, outcome_of(exc))
            raise
        finally:
            queued_ns.reset(token)
        # its executions are the batches it rode in, booked as the node ran them (`_batcher`)
        total = time.perf_counter_ns() - start  # hedged copies queue at once: their sum may exceed it
        # rows a model ran for it: all of them, none for a kept answer, only those the cloud
        # answered again when the edge's answer was kept
        ran = int(response.parameters.get("cnei_escalated", 0)) if EDGE_CACHED in response.parameters \
            else request.rows or 1
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
                        start: int, steps: StepResolver) -> oip.InferResponse:
        stats = self.stats.get(spec.model, ensemble.VERSION)
        depth = ensemble.nesting_depth(request.parameters)
        run = functools.partial(ensemble.run, spec, request, deadline_s, functools.partial(self.infer, step=True),
                                functools.partial(steps.model_variant, depth=depth + 1), steps.drawn_version)
        try:
            # Triton's top-level ensemble caching
            cached = spec.response_cache and self.cache.max_bytes
            scope = await self._ensemble_scope(spec, depth, steps) if cached else None
            if scope is not None:
                response = await self.cache.answer(scope, request, spec.model, stats, run)
            else:
                response = await run()
        except Exception:
            stats.record(False, time.perf_counter_ns() - start)
            raise
        stats.record(True, time.perf_counter_ns() - start, request.rows or 1, executed=False,
                     cache_hit=from_cache(response))
        return response

    async def _ensemble_scope(self, spec: DeploymentSpec, depth: int, steps: StepResolver) -> str | None:
        """What decides an ensemble's answer besides its inputs: the steps as applied, the version
        each resolves to now and the precision policy it is served under (a step without its own
        precision takes its model's deployment's; a nested ensemble: its own scope), so a new
        version or precision of a step's model never meets answers of the old one. None (not
        cached) while a step that names no version has a canary: its requests go to either version
        at random, a kept answer would be one version's for every request, and still served after
        the canary is rolled back."""
        ensemble.check_depth(spec, depth)
        scopes = []
        for step in spec.ensemble:
            deployed = await steps.deployment(step.model)
            if deployed.ensemble:
                nested = await self._ensemble_scope(deployed, depth + 1, steps)
                if nested is None:
                    return None
                scopes.append(nested)
                continue
            if not step.version and deployed.rollout.canary and deployed.rollout.canary_percent > 0:
                return None
            version = await steps.stable_version(step)
            policy = request_policy({"precision": step.precision} if step.precision else {}, deployed)
            scopes.append(f"{version}/{policy}")
        return f"{spec.model}/ensemble/{spec.ensemble!r}/{scopes}"

    # --- joint inference --------------------------------------------------------------------
    async def _joint(self, request: oip.InferRequest, variants: list[ModelVariant], spec: DeploymentSpec,
                     mode: str, deadline_s: float | None) -> oip.InferResponse:
        """Answer at the edge; `sync` escalates low-confidence rows to the cloud model, `async`
        validates every row in the background and reports disagreements. A request whose `tier`
        is edge stays there (nothing goes to the cloud), one whose `tier` is cloud goes there."""
        j = spec.joint
        check_outputs(variants[0], request.outputs)
        params = request.parameters
        # one budget for the whole joint request: the cloud gets what the edge left of it
        end = request_deadline(params, deadline_s, self.settings.forward_timeout_s)
        edge_params = {k: v for k, v in params.items() if k not in ("timeout_us", "timeout")}  # `end` bounds it
        if j.edge_precision and not policy_from_params(params).precision:
            edge_params["precision"] = j.edge_precision
        # every output: the joint one is read whatever the client asked for
        edge_request = replace(request, outputs=[], parameters=edge_params)
        edge_spec = replace(spec, tiers=tuple(t for t in spec.tiers if t == "edge"))
        if not self.placer.unavoided([n for n in self.eligible_nodes(edge_spec) if n.tier == "edge"],
                               variants, request_policy(edge_params, edge_spec)):
            if not spec.cloud_fallback:
                raise NoLiveNode(request.model_name, self.out_of_use(edge_spec, str(params.get("region", "") or ""),
                                                                     [v.key for v in variants]))
            cloud = await self._cloud(request, spec, end - time.monotonic(), reason="no edge node")
            cloud.outputs = answered_outputs(cloud.outputs, request.outputs or [t.name for t in variants[0].outputs],
                                             request.model_name, cloud.model_name)
            cloud.parameters.update({"cnei_joint": mode, "cnei_escalated": request.rows,
                                     "cnei_cloud_node": cloud.parameters.get("cnei_node", "")})
            return cloud
        response = await self._infer(edge_request, variants, edge_spec, end - time.monotonic())
        output = j.output or next(iter(response.outputs), "")
        probs = joint_scores(response.outputs, output, request.model_name)
        response.parameters["cnei_joint"] = mode
        edge_only = str(params.get("tier", "") or "") == "edge"
        if mode == "async" and not edge_only and len(probs):
            self._background.spawn(self._validate(request, spec, probs, output))
        elif mode == "sync":
            await self._escalate(request, spec, response, probs, end, keep_edge=edge_only)
        response.outputs = only(response.outputs, request.outputs)
        return response

    async def _escalate(self, request: oip.InferRequest, spec: DeploymentSpec, response: oip.InferResponse,
                        probs: np.ndarray, end: float, keep_edge: bool) -> None:
        """Sync joint inference: the rows of `response` the edge was unsure of, answered again by
        the cloud model within what is left of the request's deadline `end` (unless the request is
        critical, `keep_edge`, or the cloud too far). A cloud that cannot answer in time (down,
        timed out, too little time left) leaves the edge answer, saying why (`ESCALATION_ERROR`)."""
        critical = str(request.parameters.get("critical", "")).lower() in ("true", "1") or \
            request.parameters.get("critical") is True
        rows = rows_below(probs, spec.joint.threshold)
        response.parameters["cnei_escalated"] = 0
        rtt = self._cloud_rtt()
        if not len(rows) or keep_edge or prefer_edge(critical, rtt, spec.joint.latency_threshold_ms):
            return
        left = end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"deadline passed before model '{request.model_name}' could be escalated")
        budget = left * ESCALATION_SHARE
        if budget <= (rtt or 0.0) / 1e3:
            self._keep_edge(request, response, f"{left * 1e3:.1f} ms of the request's deadline left: too little "
                                               "for the cloud")
            return
        cloud_request = replace(request, inputs={k: v[rows] for k, v in request.inputs.items()})
        try:
            cloud = await self._cloud(cloud_request, spec, budget, reason="low confidence")
        except CneiError as exc:
            if exc.code not in RETRYABLE:
                raise
            self._keep_edge(request, response, exc.message)
            return
        answered = only(response.outputs, request.outputs)
        merged = merge_rows(answered, cloud.outputs, rows, request.model_name, cloud.model_name)
        response.outputs = {**response.outputs, **merged}
        if from_cache(response) and not from_cache(cloud):  # the cloud ran rows: no longer a kept answer
            del response.parameters[CACHED]
            response.parameters[EDGE_CACHED] = True
        ESCALATIONS.labels(request.model_name, "sync").inc(len(rows))
        self.recent.append({"kind": "escalation", "time": time.time(), "model": request.model_name,
                            "rows": int(len(rows)), "to": cloud.parameters.get("cnei_node", "")})
        response.parameters["cnei_escalated"] = int(len(rows))
        response.parameters["cnei_cloud_node"] = cloud.parameters.get("cnei_node", "")

    def _keep_edge(self, request: oip.InferRequest, response: oip.InferResponse, why: str) -> None:
        """The edge answer stands for rows the cloud could not answer: the response says why."""
        log.warning("joint inference of %s keeps the edge answer: %s", request.model_name, why)
        response.parameters["cnei_escalated"] = 0
        response.parameters[ESCALATION_ERROR] = why

    def _cloud_rtt(self) -> float | None:
        rtts = [self.nodes.rtt_ms[n.node_id] for n in self.nodes.nodes
                if n.tier == "cloud" and n.node_id in self.nodes.rtt_ms]
        return min(rtts) if rtts else None

    async def _cloud(self, request: oip.InferRequest, spec: DeploymentSpec, deadline_s: float | None,
                     reason: str) -> oip.InferResponse:
        """`request` served by the joint cloud model within `deadline_s` (what is left of the
        request's own budget: its `timeout_us` / `timeout` are not counted again from now)."""
        j = spec.joint
        model = j.cloud_model or request.model_name
        variants = await self.catalog.variants(model, j.cloud_version)
        cloud_spec = replace(await self.catalog.deployment(model), tiers=("cloud",), cloud_fallback=True)
        params = {k: v for k, v in request.parameters.items()
                  if k not in ("precision", "joint", "tier", "timeout_us", "timeout")}
        if j.cloud_precision:
            params["precision"] = j.cloud_precision
        # every output of the cloud model: the caller merges those the edge answer has
        cloud_request = replace(request, model_name=model, model_version=j.cloud_version, parameters=params,
                                outputs=[])
        with _tracer.start_as_current_span("coordinator.escalate") as span:
            span.set_attributes({"cnei.model": model, "cnei.escalation.reason": reason,
                                 "cnei.batch_size": request.rows})
            return await self._infer(cloud_request, variants, cloud_spec, deadline_s)

    async def _validate(self, request: oip.InferRequest, spec: DeploymentSpec, edge_probs: np.ndarray,
                        output: str) -> None:
        """Async mode: ask the cloud model too; disagreements become hard-example events."""
        try:
            cloud = await self._cloud(request, spec, None, reason="async validation")
        except CneiError as exc:
            log.warning("async validation of %s failed: %s", request.model_name, exc.message)
            return
        cloud_probs = cloud.outputs.get(output, next(iter(cloud.outputs.values())))
        rows = disagreements(edge_probs, cloud_probs)
        ESCALATIONS.labels(request.model_name, "async").inc(len(edge_probs))
        if not len(rows):
            return
        DISAGREEMENTS.labels(request.model_name).inc(len(rows))
        inputs = {name: array[rows].tolist() for name, array in request.inputs.items()}
        event = {"model": request.model_name, "cloud_model": cloud.model_name, "rows": rows.tolist(),
                 "edge_labels": np.argmax(edge_probs[rows], axis=-1).tolist(),
                 "cloud_labels": np.argmax(cloud_probs[rows], axis=-1).tolist(), "inputs": inputs}

        def without_inputs(exc: events.EventRefused) -> dict:  # too big with them (for NATS, or the stream)
            log.warning("disagreement event of %s sent without its inputs: %s", request.model_name, exc)
            return {**event, "inputs": {}, "inputs_dropped": exc.reason}
        await self.announce(events.INFERENCE_DISAGREEMENT, event, without_inputs)

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

    def place(self, request: oip.InferRequest, variants: list[ModelVariant], spec: DeploymentSpec) -> Placement | None:
        """The first attempt's placement for `request`, as the full path decides it (a span)."""
        return self.placer.place(request, variants, spec)

    def place_spread(self, request: oip.InferRequest, variants: list[ModelVariant], spec: DeploymentSpec,
                     limit: int, margin: float) -> list[Placement]:
        """Where requests like this one may go, `place`'s choice first (`Placer.place_spread`)."""
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
