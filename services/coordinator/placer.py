"""Choosing a request's node and variant: the nodes its deployment and their breakers allow, the
variant its precision policy picks on each node class, and the scheduler's choice among them
weighed by the rows outstanding at each node (this process's and the front door's)."""
from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from opentelemetry import trace

from services.common import oip, telemetry
from services.common.deployment import DeploymentSpec, serving_tiers
from services.common.errors import CneiError, FailedPrecondition, InvalidArgument
from services.common.model_spec import ModelVariant
from services.common.nodes import NodeInfo
from services.coordinator.breaker import Breakers
from services.coordinator.nodes_view import NodesView
from services.coordinator.placement import (RequestContext, Scheduler, failover_stages, rank, request_region, spread,
                                             with_door_rows)
from services.coordinator.precision import PrecisionPolicy, choose_variant, request_policy

_tracer = trace.get_tracer(__name__)
# The front door's rows count in placement for this many of its report intervals (at least 1 s)
# after its last report: it reports whenever they change, and while any is held, every interval
DOOR_ROWS_REPORTS_KEPT = 5


@dataclass(frozen=True)
class Placement:
    node: NodeInfo
    variant: ModelVariant


def restrict_tier(spec: DeploymentSpec, params: dict) -> DeploymentSpec:
    """A request's `tier` parameter (edge | cloud) narrows where it may run to that tier, of
    those the deployment allows: FAILED_PRECONDITION when it allows no such tier."""
    tier = str(params.get("tier", "") or "")
    if not tier:
        return spec
    if tier not in ("edge", "cloud"):
        raise InvalidArgument(f"parameter 'tier' must be 'edge' or 'cloud', got {tier!r}")
    allowed = serving_tiers(spec)
    if tier not in allowed:
        raise FailedPrecondition(f"model '{spec.model}' is not deployed on the {tier} tier "
                                 f"(its deployment allows {sorted(allowed)}): parameter 'tier' only narrows it")
    return replace(spec, tiers=(tier,), cloud_fallback=tier == "cloud")


def _placement_context(variants: list[ModelVariant], policy: PrecisionPolicy, region: str,
                       nodes: list[NodeInfo], choices: dict[str, ModelVariant | CneiError]) -> RequestContext:
    """What the scheduler knows of a request. Each node of `nodes` is judged warm or cold on the
    variant it would serve (`choices`: per node class, as `variants_by_class` gives), so a policy
    that picks INT8 favours nodes with INT8 loaded; any other on the explicit precision, else
    the default variant (NOT_FOUND for a precision the model lacks)."""
    default = choose_variant(variants, PrecisionPolicy(precision=policy.precision), "")
    keys = {n.node_id: choice.key for n in nodes
            if isinstance(choice := choices.get(node_class(n)), ModelVariant)}
    return RequestContext(model=default.name, variant_key=default.key, region=region, variant_keys=keys)


def node_class(node: NodeInfo) -> str:
    """The class a node's measured latencies are kept under (its tier unless it names one)."""
    return node.node_class or node.tier


def variants_by_class(variants: list[ModelVariant], policy: PrecisionPolicy,
                      nodes: list[NodeInfo]) -> dict[str, ModelVariant | CneiError]:
    """The variant `policy` chooses on each node class of `nodes`, or why none fits there."""
    choices: dict[str, ModelVariant | CneiError] = {}
    for cls in sorted({node_class(n) for n in nodes}):
        try:
            choices[cls] = choose_variant(variants, policy, cls)
        except CneiError as exc:
            choices[cls] = exc
    return choices


def refuse_policy(choices: dict[str, ModelVariant | CneiError]) -> None:
    """Raise why no node class has a variant meeting the policy (every class's reason), when
    there are classes and none has one."""
    if not choices or any(isinstance(c, ModelVariant) for c in choices.values()):
        return
    errors = list(choices.values())
    messages = list(dict.fromkeys(e.message for e in errors))
    if len(messages) == 1:
        raise errors[0]
    raise CneiError("; ".join(messages), errors[0].code)


class Placer:
    """Where a request's attempts go: `outstanding` (rows this process has queued for each node
    or sent it, kept by its attempts) and the front door's reported rows weigh in."""

    def __init__(self, nodes: NodesView, breakers: Breakers, scheduler: Scheduler, outstanding: dict[str, int],
                 door_report_ms: float):
        self.nodes = nodes
        self.breakers = breakers
        self.scheduler = scheduler
        self.outstanding = outstanding
        # The front door's rows at each node by its last report, and when that came (monotonic):
        # placement weighs them beside its own (`rows_outstanding`) while the report is fresh
        self.door_rows: dict[str, int] = {}
        self.door_rows_at: float | None = None
        self.door_rows_max_age_s = max(1.0, DOOR_ROWS_REPORTS_KEPT * door_report_ms / 1e3)

    def door_reported(self, rows: dict[str, int], now: float) -> None:
        """The front door's rows queued for and in flight to each node, as its report at `now`
        (monotonic) says them: every node it counts rows at."""
        self.door_rows, self.door_rows_at = rows, now

    def rows_outstanding(self) -> Mapping[str, int]:
        """Rows outstanding per node as placement weighs them: this process's own plus the front
        door's by its last report, unless that is over `door_rows_max_age_s` old."""
        age = None if self.door_rows_at is None else time.monotonic() - self.door_rows_at
        return with_door_rows(self.outstanding, self.door_rows, age, self.door_rows_max_age_s)

    def place(self, request: oip.InferRequest, variants: list[ModelVariant], spec: DeploymentSpec) -> Placement | None:
        """The first attempt's placement for `request`, as the full path decides it (a span)."""
        params = request.parameters
        return self.decide(variants, spec, request_policy(params, spec), request_region(params), None, [])

    def place_spread(self, request: oip.InferRequest, variants: list[ModelVariant], spec: DeploymentSpec,
                     limit: int, margin: float) -> list[Placement]:
        """Where requests like this one may go, `place`'s choice first, for a front door that
        spreads one kind of request over them: under the edgeai policy, its peers
        (`placement.spread`) scoring within `margin` of it (up to `limit`); under a baseline
        policy (round_robin, random, least_loaded), every node the full path would choose among
        (by node id), which the door then chooses between per request by that policy."""
        first = self.place(request, variants, spec)
        baseline = spec.scheduler.policy != "edgeai"
        if first is None or not baseline and limit <= 1:
            return [first] if first is not None else []
        policy = request_policy(request.parameters, spec)
        eligible = self.eligible_nodes(spec)
        choices = variants_by_class(variants, policy, eligible)
        fits = self._fits(eligible, choices)
        if baseline:
            nodes = sorted(fits, key=lambda n: n.node_id)
        else:
            ctx = _placement_context(variants, policy, str(request.parameters.get("region", "") or ""), fits, choices)
            ranked = rank(fits, ctx, spec.scheduler, self.rows_outstanding(), self.nodes.rtt_ms, self.nodes.compute_ms)
            nodes = spread(ranked, spec.scheduler.threshold, margin, limit)
        return [first] + [Placement(n, choices[node_class(n)]) for n in nodes if n.node_id != first.node.node_id]

    def eligible_nodes(self, spec: DeploymentSpec) -> list[NodeInfo]:
        """Live nodes of the deployment's tiers whose circuit breaker lets calls through."""
        tiers = serving_tiers(spec)
        blocked = self.breakers.blocked() | self.nodes.unhealthy.keys()
        return [n for n in self.nodes.nodes if n.tier in tiers and n.node_id not in blocked]

    def out_of_use(self, spec: DeploymentSpec, region: str = "", models: Collection[str] = ()) -> dict[str, str]:
        """Live nodes of the deployment's tiers no call (of any of the variants `models`) may go to
        now (failed health check, open breaker), with why: those of `region` first, then by id."""
        tiers = serving_tiers(spec)
        why = {**self.breakers.why_blocked(models), **self.nodes.unhealthy}
        out = sorted((n for n in self.nodes.nodes if n.tier in tiers and n.node_id in why),
                     key=lambda n: (n.region != region, n.node_id))
        return {n.node_id: why[n.node_id] for n in out}

    def _fits(self, pool: list[NodeInfo], choices: dict[str, ModelVariant | CneiError]) -> list[NodeInfo]:
        """The nodes of `pool` whose class has a variant meeting the policy (`choices`) and whose
        breaker of that variant lets calls through (a model failing on a node is avoided there)."""
        return [n for n in pool if isinstance(chosen := choices[node_class(n)], ModelVariant)
                and self.breakers.allows(n.node_id, chosen.key)]

    def others_left(self, variants: list[ModelVariant], spec: DeploymentSpec, policy: PrecisionPolicy,
                    tried: Collection[str]) -> bool:
        """Whether a node not in `tried` could still take the request (a failover target)."""
        pool = [n for n in self.eligible_nodes(spec) if n.node_id not in tried]
        return bool(self._fits(pool, variants_by_class(variants, policy, pool)))

    def unavoided(self, nodes: list[NodeInfo], variants: list[ModelVariant],
                  policy: PrecisionPolicy) -> list[NodeInfo]:
        """`nodes` but those avoided for the variant `policy` chooses on their class (after it
        failed there); those whose class has none are kept: placement says why."""
        choices = variants_by_class(variants, policy, nodes)
        return [n for n in nodes if not isinstance(chosen := choices[node_class(n)], ModelVariant)
                or self.breakers.allows(n.node_id, chosen.key)]

    def choose(self, variants: list[ModelVariant], spec: DeploymentSpec, policy: PrecisionPolicy,
               region: str, pool: list[NodeInfo], tried: list[str]) -> Placement | None:
        """The scheduler's choice among the nodes of `pool` whose class has a variant meeting
        `policy` (a latency budget may fit one node class and not another)."""
        choices = variants_by_class(variants, policy, pool)
        fits = self._fits(pool, choices)
        ctx = _placement_context(variants, policy, region, fits, choices)
        node = self.scheduler.choose(fits, ctx, spec.scheduler, self.rows_outstanding(),
                                     self.nodes.rtt_ms, exclude=tried, compute_ms=self.nodes.compute_ms)
        return None if node is None else Placement(node, choices[node_class(node)])

    def decide(self, variants: list[ModelVariant], spec: DeploymentSpec, policy: PrecisionPolicy,
               region: str, failed: NodeInfo | None, tried: list[str]) -> Placement | None:
        """The placement decision, as a span: pools in failover order, first one with a node wins.
        A first attempt that finds live nodes, none of whose classes meets `policy`, is refused
        with why (FAILED_PRECONDITION, or NOT_FOUND for a precision the model lacks)."""
        with telemetry.child_span(_tracer, "coordinator.placement") as span:
            placement = None
            for pool in self._pools(spec, failed):
                placement = self.choose(variants, spec, policy, region, pool, tried)
                if placement is not None:
                    break
            if placement is None and failed is None:
                refuse_policy(variants_by_class(variants, policy, self.eligible_nodes(spec)))
            if span.is_recording():
                span.set_attributes({
                    "cnei.model": variants[0].name, "cnei.scheduler": spec.scheduler.policy,
                    "cnei.attempt": len(tried) + 1, "cnei.excluded": ",".join(tried),
                    "cnei.node": placement.node.node_id if placement else "",
                    "cnei.precision": placement.variant.precision if placement else "",
                    "cnei.outcome": "placed" if placement else "no_node"})
            return placement

    def _pools(self, spec: DeploymentSpec, failed: NodeInfo | None) -> list[list[NodeInfo]]:
        eligible = self.eligible_nodes(spec)
        if failed is None:
            return [eligible]
        return failover_stages(eligible, failed, spec.cloud_fallback and "cloud" in spec.tiers)
