"""Routes for the compiled front door: the placement the full path would make for one kind of
request, handed out with a lifetime, and the door's reports booked against them (`door_reports`:
as if the full path had served those requests)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import Gauge

from services.common import codec, oip
from services.common.batch_formation import BatchConfig
from services.common.batcher import BATCH_SIZE
from services.common.deployment import UINT32_MAX, DeploymentSpec
from services.common.errors import CneiError
from services.common.model_spec import check_inputs
from services.common.trace_settings import TraceSettings
from services.coordinator.attempt_limit import attempt_limit_s, call_rows
from services.coordinator.core import Coordinator
from services.coordinator.door_reports import RouteReport, book_calls, book_requests
from services.coordinator.node_batchers import batch_config
from services.coordinator.placer import Placement, node_class, restrict_tier

log = logging.getLogger(__name__)
# Request parameters whose effect the route captures; any other takes the full path.
ROUTABLE_PARAMETERS = frozenset({"precision", "accuracy_floor", "latency_budget_ms", "region", "tier"})
TRITON_HINT = "triton_"  # Triton client hints (perf_analyzer sends triton_enable_empty_final_response)
MAX_ROUTES = 4096
DROPS_KEPT = 256  # the latest models named in the generation file (a door reads those past what it applied)
DOOR_NODE_ROWS = Gauge("cnei_front_door_node_rows",
                       "Rows the compiled front door has queued for the node or sent it and not yet had "
                       "answered, by every route to it, as of its last report", ["node"])
DOOR_NODE_ROWS_GIVEN_BACK = Gauge("cnei_front_door_node_rows_given_back",
                                  "Rows a route of the compiled front door still held at the node when it ended, "
                                  "since the door started: counting errors it put right (0 normally)", ["node"])


@dataclass(frozen=True)
class Route:
    """Where requests of one kind go now, batched as the deployment says (`batching.max_batch_size`
    0: a model without a batch dimension, each request sent alone)."""

    route_id: int
    model: str  # the name the client asked for (metric label)
    stats_key: tuple[str, str]  # (name, version) the full path books statistics under
    placement: Placement
    batching: BatchConfig
    timeout_ms: int
    response: oip.InferResponse  # model name, version and parameters for the client
    alternatives: tuple[Route, ...] = ()  # other nodes as good for these requests (routes of their own)
    row_ms: float = 0.0  # the node's measured compute time per row (0: not measured yet)
    response_cache: bool = False  # the deployment caches responses (the door keeps its own)
    # Where the deployment splits these requests (a canary rollout), the share its version takes
    # and the version's group (1, 2): the door draws a group by share, then the least busy of
    # its routes (each version spread over its nodes); 0: no split.
    share: float = 0.0
    group: int = 0
    # The deployment's scheduler policy: how the door picks among this route and its alternatives
    # per request (edgeai: the one answering soonest; the baselines as the full path applies them).
    policy: str = "edgeai"


@dataclass(frozen=True)
class Refusal:
    """Requests of this kind take the full path, and why."""

    reason: str


def refusal_reason(request: oip.InferRequest, spec: DeploymentSpec) -> str:
    """Why requests like this one must take the full path ('' when they need not). The door
    batches by the deployment's batching section (queue delay and preferred sizes included)."""
    others = sorted(k for k in request.parameters
                    if k not in ROUTABLE_PARAMETERS and not k.startswith(TRITON_HINT))
    if others:
        return f"parameters {others} are handled by the full path"
    if request.classes:
        return f"outputs {sorted(request.classes)} asked as classes (classification) are handled by the full path"
    if spec.joint.mode != "off":
        return f"joint inference ({spec.joint.mode}) is handled by the full path"
    if spec.hedge_after_ms:
        return "hedged requests are handled by the full path"
    return ""


class DoorRoutes:
    """Hands out routes and books the door's reports against them."""

    def __init__(self, core: Coordinator, ttl_ms: int, tracing: TraceSettings | None = None, spread_nodes: int = 1,
                 spread_margin: float = 0.0, generation_file: Path | None = None, confirm_timeout_s: float = 1.0):
        """`tracing`: the trace settings, while spans are exported (None: nothing is traced);
        one request in `trace_rate` of a route then takes the full path, to be traced.
        `spread_nodes`, `spread_margin`: a route names up to that many nodes, the best and its peers
        scoring within the margin of it (edgeai policy), which the door spreads its requests over;
        under a baseline policy it names every node the full path chooses among, whatever these say.
        `generation_file`: where the door reads which models' routes to drop (see `forget`);
        `confirm_timeout_s`: how long `forget_at_door` waits for the door to say it did."""
        self.core = core
        self.ttl_ms = ttl_ms
        self.tracing = tracing
        self.spread_nodes = max(1, spread_nodes)
        self.spread_margin = spread_margin
        self.routes: OrderedDict[int, Route] = OrderedDict()
        # Routes dropped lately (forgotten, evicted, failed): the door may still report what it
        # served by them before it hears, and that is booked (the door is then told to forget them).
        self._retired: OrderedDict[int, Route] = OrderedDict()
        self._ids: dict[tuple, int] = {}  # same decision, same id: the door keeps its batcher
        self._next = itertools.count(1)
        # Bumped whenever a model's routes are dropped, with the model named beside its number: the
        # door watches this file, drops its own routes of the models named past the number it has
        # applied, and says which number that is in its next report (`applied`). It also lists the
        # routes it holds in that report, and so learns of routes dropped otherwise (evicted).
        self.generation_file = generation_file
        self.generation = 0
        self._drops: deque[tuple[int, str]] = deque(maxlen=DROPS_KEPT)
        self.door_generation = 0  # the number the door last said it applied
        self._confirmations: list[tuple[int, asyncio.Future]] = []
        self.confirm_timeout_s = confirm_timeout_s
        self._write_generation()
        core.breakers.on_open = self.forget_node
        core.after_node_left = self.forget_node

    async def trace_every(self, model: str) -> int:
        """One request in N for `model` is to take the full path and start a trace (0: none)."""
        if self.tracing is None:
            return 0
        config = await self.tracing.config(model)
        return config.rate if config.on else 0

    async def route(self, request: oip.InferRequest) -> Route | Refusal:
        """Where requests like `request` go: one route (with its peers as alternatives), or under
        a canary rollout, for requests that name no version, the stable version's routes and the
        canary's, each with its version's share and group, which the door draws between."""
        core = self.core
        if await self.trace_every(request.model_name) == 1:
            return Refusal(f"every request for model '{request.model_name}' is traced (trace_rate 1)")
        try:
            if core.control is not None:
                await core.control.check(request.model_name)
            deployed = await core.catalog.deployment(request.model_name)
            if deployed.ensemble:
                return Refusal(f"model '{request.model_name}' is an ensemble: the coordinator runs its steps")
            rollout = deployed.rollout
            if not (rollout.canary_percent > 0 and not request.model_version):
                return await self._routes(request, deployed, request.model_version)
            if rollout.canary_percent >= 100:  # no split: every such request to the canary
                return await self._routes(request, deployed, rollout.canary)
            stable = await self._routes(request, deployed, rollout.stable)
            canary = await self._routes(request, deployed, rollout.canary)
        except CneiError as exc:  # the full path answers these requests with this error
            return Refusal(exc.message)
        for decision in (stable, canary):
            if isinstance(decision, Refusal):
                return decision
        share = rollout.canary_percent / 100.0
        split = [replace(r, alternatives=(), share=version_share, group=group)
                 for group, (decision, version_share) in enumerate(((stable, 1.0 - share), (canary, share)), 1)
                 for r in (decision, *decision.alternatives)]
        return replace(split[0], alternatives=tuple(split[1:]))

    async def _routes(self, request: oip.InferRequest, deployed: DeploymentSpec, version: str) -> Route | Refusal:
        """The route of `version` ("": the stable one) for requests like `request`, its peers as
        alternatives; CneiError for what the full path answers with an error. No route names a node
        whose breaker, or whose breaker of the route's variant, is not closed: past its open period
        the door would send it every such request at once, claiming no probe, so requests the node
        is chosen for take the full path, which sends it one (half-open), and as a peer it is left
        out until the probe the coordinator sends it itself (`Coordinator.probe`) closes them."""
        core = self.core
        variants = await core.catalog.variants(request.model_name, version)
        spec = restrict_tier(deployed, request.parameters)
        reason = refusal_reason(request, spec)
        if reason:
            return Refusal(reason)
        # the interface, not this request's rows: the route serves requests of every batch size
        # (the door checks each one's rows against max_batch_size and forwards those it refuses)
        check_inputs(variants[0], request.inputs, rows=False)
        unsized = [o.name for o in variants[0].outputs if codec.datatype(o.datatype, o.name).dtype.kind == "O"]
        if unsized:  # a batch's reply is cut into rows by bytes, which BYTES elements do not allow
            return Refusal(f"model '{request.model_name}' has BYTES outputs ({', '.join(unsized)}): "
                           "the coordinator splits their rows")
        placements = core.place_spread(request, variants, spec, self.spread_nodes, self.spread_margin)
        if not placements:
            return Refusal(f"no live node serves model '{request.model_name}'")
        first = placements[0]
        if core.breakers.on_trial(first.node.node_id, first.variant.key):
            why = core.breakers.reason(first.node.node_id, first.variant.key) or "circuit breaker open"
            return Refusal(f"node {first.node.node_id} is on trial after failures ({why}): the full path probes it")
        if not (first.node.fast_address and core.settings.fast_lane):
            return Refusal(f"node {first.node.node_id} offers no fast lane")
        for peer in placements[1:]:  # on trial: past its open period, the coordinator probes it itself
            if core.breakers.on_trial(peer.node.node_id, peer.variant.key):
                core.probe(request, peer, spec)
        stats_key = (variants[0].name, variants[0].version)
        routes = [self._route_to(request.model_name, stats_key, p, spec, request.rows) for p in placements
                  if p.node.fast_address and not core.breakers.on_trial(p.node.node_id, p.variant.key)]
        return replace(routes[0], alternatives=tuple(routes[1:]), policy=spec.scheduler.policy)

    def _route_to(self, model: str, stats_key: tuple[str, str], placement: Placement,
                  spec: DeploymentSpec, request_rows: int) -> Route:
        """The route to one placement; its node-call limit is the attempt limit for its largest
        call (`attempt_limit`): a batch, or a request of the route's own shape, unbatched."""
        batching = batch_config(spec, placement.variant)
        if not placement.variant.max_batch_size:
            batching = replace(batching, max_batch_size=0)
        response = self.core.answer_template(model, placement)
        response.parameters["cnei_front_door"] = True  # answered by the door, not the full path
        rows = call_rows(spec, placement.variant, request_rows)  # unbatched: routes are made per shape
        limit_ms = attempt_limit_s(spec, placement.variant, node_class(placement.node), rows) * 1e3
        route = self._remember(model, stats_key, placement, batching, min(UINT32_MAX, math.ceil(limit_ms)), response)
        return replace(route, row_ms=self.core.nodes.compute_ms.get(placement.node.node_id, 0.0),
                       response_cache=spec.response_cache)

    def _remember(self, model: str, stats_key: tuple[str, str], placement: Placement, batching: BatchConfig,
                  timeout_ms: int, response: oip.InferResponse) -> Route:
        key = (model, stats_key, placement.node.node_id, placement.node.fast_address, placement.variant.key,
               batching, timeout_ms, tuple(sorted(response.parameters.items())))
        if len(self._ids) > 4 * MAX_ROUTES:
            self._ids.clear()
        route_id = self._ids.get(key) or self._ids.setdefault(key, next(self._next))
        route = Route(route_id, model, stats_key, placement, batching, timeout_ms, response)
        self.routes[route_id] = route
        self.routes.move_to_end(route_id)
        while len(self.routes) > MAX_ROUTES:  # the door asks again for a route it is told is gone
            self._retire(self.routes.popitem(last=False)[1])
        return route

    def forget(self, model: str) -> int:
        """Drop every route of `model` (loaded, unloaded, republished or redeployed) and tell the
        door to drop its own: returns the generation that names it."""
        for route_id in [route_id for route_id, route in self.routes.items() if route.model == model]:
            self._retire(self.routes.pop(route_id))
        self.generation += 1
        self._drops.append((self.generation, model))
        self._write_generation()
        return self.generation

    def forget_node(self, node_id: str, model: str = "") -> None:
        """The node left the view, or its breaker opened (`model` "": its own; else that of the
        variant `model` on it): drop the routes of every model routed to it (with that variant),
        so the door stops sending there now (it would until its next refresh, using a stale route
        meanwhile)."""
        for name in {route.model for route in self.routes.values() if route.placement.node.node_id == node_id
                     and model in ("", route.placement.variant.key)}:
            self.forget(name)

    async def forget_at_door(self, model: str) -> bool:
        """`forget`, then wait until the door says it dropped its routes of `model` (a load or
        unload answered after that: no request is served by the old routes). False when the door
        did not say so within `confirm_timeout_s` (it then still drops them at its next report)."""
        generation = self.forget(model)
        if self.door_generation >= generation:
            return True
        confirmed = asyncio.get_running_loop().create_future()
        entry = (generation, confirmed)
        self._confirmations.append(entry)
        try:
            await asyncio.wait_for(confirmed, self.confirm_timeout_s)
            return True
        except asyncio.TimeoutError:
            log.warning("front door did not confirm dropping the routes of model '%s' within %.1f s",
                        model, self.confirm_timeout_s)
            return False
        finally:
            self._confirmations.remove(entry)

    def applied(self, generation: int) -> None:
        """The door has dropped its routes of every model named up to `generation`."""
        if generation <= self.door_generation:
            return
        self.door_generation = generation
        for wanted, confirmed in self._confirmations:
            if wanted <= generation and not confirmed.done():
                confirmed.set_result(None)

    def _write_generation(self) -> None:
        """The file: the generation on the first line, then `number<TAB>model` per model dropped
        lately, so the door never reads half a file (written aside, then renamed)."""
        if self.generation_file is None:
            return
        partial = self.generation_file.with_suffix(".partial")
        partial.write_text("\n".join([str(self.generation), *(f"{g}\t{m}" for g, m in self._drops)]) + "\n")
        os.replace(partial, self.generation_file)

    def _retire(self, route: Route) -> None:
        self._retired[route.route_id] = route
        while len(self._retired) > MAX_ROUTES:
            self._retired.popitem(last=False)

    def node_rows(self, rows: dict[str, tuple[int, int]]) -> None:
        """The door's rows outstanding per node (queued for it or sent it, every model's) and the
        rows its routes still held when they ended (counting errors, put right), as its report
        says them: what its least_loaded policy weighs, shown as gauges, and weighed by the
        coordinator's placement beside its own rows (`Coordinator.door_reported`)."""
        self.core.door_reported({node: outstanding for node, (outstanding, _) in rows.items()}, time.monotonic())
        for node, (outstanding, given_back) in rows.items():
            DOOR_NODE_ROWS.labels(node).set(outstanding)
            DOOR_NODE_ROWS_GIVEN_BACK.labels(node).set(given_back)

    def apply(self, reports: list[RouteReport]) -> list[int]:
        """Book what the door served; returns the route ids this process does not know (or no
        longer serves by: what the door served by a route dropped lately is still booked)."""
        unknown = []
        for report in reports:
            route = self.routes.get(report.route_id)
            if route is None:
                unknown.append(report.route_id)
                route = self._retired.get(report.route_id)
                if route is None:
                    continue
            book_requests(self.core, route, report)
            self._book_node(route, report)
        return unknown

    def _book_node(self, route: Route, report: RouteReport) -> None:
        """What the door's calls say of the route's node (`book_calls`), unless the node left the
        view (what was kept for it is gone, and a node id back at other addresses is another
        node); a failed route is dropped."""
        batch_size = BATCH_SIZE.labels(route.model)
        for b in report.batches:
            batch_size.observe(b.rows)
        node = route.placement.node
        if any(n.place == node.place for n in self.core.nodes.nodes):
            book_calls(self.core, route, report)
        if report.failure and self.routes.pop(route.route_id, None) is not None:
            self._retire(route)
