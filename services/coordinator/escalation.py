"""Joint inference: a request answered at the edge, and the rows the edge was unsure of answered
again by the cloud model (`sync`, within the request's deadline), or every row checked by the cloud
in the background with the disagreements reported as hard-example events (`async`)."""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace

import numpy as np
from opentelemetry import trace
from prometheus_client import Counter

from services.common import events, oip
from services.common.background import Background
from services.common.batcher import request_deadline
from services.common.deployment import DeploymentSpec
from services.common.errors import CneiError, DeadlineExceeded, NoLiveNode
from services.common.model_spec import ModelVariant, check_outputs
from services.coordinator.attempts import RETRYABLE
from services.coordinator.catalog import Catalog
from services.coordinator.joint import (answered_outputs, disagreements, joint_scores, merge_rows, only,
                                       prefer_edge, rows_below)
from services.coordinator.nodes_view import NodesView
from services.coordinator.placement import request_region
from services.coordinator.placer import Placer
from services.coordinator.precision import policy_from_params, request_policy
from services.coordinator.response_cache import CACHED, from_cache
from services.coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
# reason: low_confidence (sync's unsure rows), validation (async), tier_cloud / no_edge_node (the
# whole request answered in the cloud: asked for, or no edge node to answer it with cloud_fallback)
ESCALATIONS = Counter("cnei_escalations_total", "Rows sent to the cloud model by joint inference",
                      ["model", "mode", "reason"])
DISAGREEMENTS = Counter("cnei_joint_disagreements_total", "Rows where edge and cloud disagreed (async)",
                        ["model"])
# response parameter: sync joint inference's edge answer came from the response cache, and the
# cloud answered its unsure rows again (so the answer as a whole is not a kept one)
EDGE_CACHED = "cnei_edge_response_cache"
ESCALATION_ERROR = "cnei_escalation_error"  # response parameter: why sync joint kept the edge answer
# response parameter: sync joint kept the edge answer of unsure rows without asking the cloud, and why
ESCALATION_SKIPPED = "cnei_escalation_skipped"
# response parameter: the model that answered in the cloud (the joint cloud_model, else the model
# itself); of a request it answered whole, cnei_version and cnei_precision are this model's
CLOUD_MODEL = "cnei_cloud_model"
# Of what the edge left of a sync joint request's deadline, the share the cloud gets: the rest is
# kept to answer with the edge's rows after a cloud timeout, before the caller's deadline
ESCALATION_SHARE = 0.9
# Serves a request of the given variants under a deployment within a deadline (the coordinator's
# full path: response cache, placement, attempts)
Serve = Callable[[oip.InferRequest, list[ModelVariant], DeploymentSpec, float | None], Awaitable[oip.InferResponse]]
Announce = Callable[..., Awaitable[None]]
# The models unloaded through the repository API (`repository.ModelControl`), or None without one
Control = Callable[[], object]


class Escalation:
    """Joint inference over `serve`: the edge's nodes first (those `placer` allows), then the
    joint cloud model as the coordinator's `catalog` (read at each use) resolves it, unless it
    was unloaded (`control`); escalations are noted in `recent`, disagreements announced."""

    def __init__(self, settings: CoordinatorSettings, catalog: Callable[[], Catalog], nodes: NodesView,
                 placer: Placer, serve: Serve, recent: deque[dict], background: Background, announce: Announce,
                 control: Control):
        self.settings = settings
        self._catalog = catalog
        self.nodes = nodes
        self.placer = placer
        self.serve = serve
        self.recent = recent
        self._background = background
        self.announce = announce
        self._control = control

    @property
    def catalog(self) -> Catalog:
        return self._catalog()

    @property
    def control(self):
        """The model control in force, read at each use (the coordinator gets its own after it is
        built; None: no model is unloaded)."""
        return self._control()

    async def joint(self, request: oip.InferRequest, variants: list[ModelVariant], spec: DeploymentSpec,
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
        if not self.placer.unavoided([n for n in self.placer.eligible_nodes(edge_spec) if n.tier == "edge"],
                                     variants, request_policy(edge_params, edge_spec)):
            if not spec.cloud_fallback:
                raise NoLiveNode(request.model_name, self.placer.out_of_use(
                    edge_spec, request_region(params), [v.key for v in variants]))
            reason = "tier_cloud" if str(params.get("tier", "") or "") == "cloud" else "no_edge_node"
            cloud = await self._cloud(request, spec, end - time.monotonic(), reason=reason)
            cloud.outputs = answered_outputs(cloud.outputs, request.outputs or [t.name for t in variants[0].outputs],
                                             request.model_name, cloud.model_name)
            self._escalated(request, mode, reason, request.rows, cloud)
            cloud.parameters.update({"cnei_joint": mode, "cnei_escalated": request.rows, CLOUD_MODEL: cloud.model_name,
                                     "cnei_cloud_node": cloud.parameters.get("cnei_node", "")})
            # the model and version asked for, as Triton and KServe echo them
            cloud.model_name, cloud.model_version = request.model_name, variants[0].version
            return cloud
        response = await self.serve(edge_request, variants, edge_spec, end - time.monotonic())
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
        critical, `keep_edge`, or the cloud too far: `ESCALATION_SKIPPED` says so). A cloud that cannot answer in time (down,
        timed out, too little time left) leaves the edge answer, saying why (`ESCALATION_ERROR`)."""
        critical = str(request.parameters.get("critical", "")).lower() in ("true", "1") or \
            request.parameters.get("critical") is True
        rows = rows_below(probs, spec.joint.threshold)
        response.parameters["cnei_escalated"] = 0
        rtt = self._cloud_rtt()
        if not len(rows) or keep_edge or critical:
            return
        if prefer_edge(critical, rtt, spec.joint.latency_threshold_ms):
            response.parameters[ESCALATION_SKIPPED] = (f"the cloud's round trip, {rtt:.1f} ms, is over "
                                                       f"latency_threshold_ms {spec.joint.latency_threshold_ms}")
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
            cloud = await self._cloud(cloud_request, spec, budget, reason="low_confidence")
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
        self._escalated(request, "sync", "low_confidence", len(rows), cloud)
        response.parameters["cnei_escalated"] = int(len(rows))
        response.parameters["cnei_cloud_node"] = cloud.parameters.get("cnei_node", "")
        response.parameters[CLOUD_MODEL] = cloud.model_name

    def _escalated(self, request: oip.InferRequest, mode: str, reason: str, rows: int,
                   cloud: oip.InferResponse) -> None:
        """`rows` of the request the cloud answered for its reply: counted and noted, with why."""
        ESCALATIONS.labels(request.model_name, mode, reason).inc(rows)
        self.recent.append({"kind": "escalation", "time": time.time(), "model": request.model_name,
                            "rows": int(rows), "to": cloud.parameters.get("cnei_node", ""), "reason": reason})

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
        request's own budget: its `timeout_us` / `timeout` are not counted again from now).
        UNAVAILABLE when the cloud model was unloaded: out of service for the whole mesh."""
        j = spec.joint
        model = j.cloud_model or request.model_name
        control = self.control
        if control is not None:
            await control.check(model)
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
            return await self.serve(cloud_request, variants, cloud_spec, deadline_s)

    async def _validate(self, request: oip.InferRequest, spec: DeploymentSpec, edge_probs: np.ndarray,
                        output: str) -> None:
        """Async mode: ask the cloud model too; disagreements become hard-example events."""
        try:
            cloud = await self._cloud(request, spec, None, reason="validation")
        except CneiError as exc:
            log.warning("async validation of %s failed: %s", request.model_name, exc.message)
            return
        cloud_probs = cloud.outputs.get(output, next(iter(cloud.outputs.values())))
        rows = disagreements(edge_probs, cloud_probs)
        ESCALATIONS.labels(request.model_name, "async", "validation").inc(len(edge_probs))
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
