"""Node choice for a request: EdgeAIScheduler scores and the baseline policies (pure maths)."""
from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from services.common.deployment import SchedulerSpec
from services.common.nodes import NodeInfo

RTT_REFERENCE_MS = 10.0
WAIT_REFERENCE_MS = 10.0


@dataclass(frozen=True)
class RequestContext:
    """What placement knows of a request: the variant each node would serve it with, by node id
    (`variant_keys`; a precision policy may choose another variant per node class), else
    `variant_key`."""

    model: str
    variant_key: str
    region: str = ""
    critical: bool = False
    variant_keys: Mapping[str, str] = field(default_factory=dict)

    def key_on(self, node: NodeInfo) -> str:
        """The key of the variant `node` would serve the request with."""
        return self.variant_keys.get(node.node_id, self.variant_key)


@dataclass(frozen=True)
class NodeScore:
    node: NodeInfo
    total: float
    resource: float
    locality: float
    model: float
    network: float


def _clamp(x: float) -> float:
    return max(0.0, min(1.0, x))


def queue_pressure(node: NodeInfo, outstanding: int, compute_ms: float | None = None) -> float:
    """0..1: how long work sent now would wait. With a measured compute time per row, the
    expected wait of the queue (node in-flight + rows we queued or sent) against a 10 ms
    reference; without one, queue depth against four requests per CPU."""
    rows = node.inflight + outstanding
    if compute_ms is None:
        return min(1.0, rows / max(1, node.cpus * 4))
    wait = (rows + 1) * compute_ms
    return wait / (wait + WAIT_REFERENCE_MS)


def resource_score(node: NodeInfo, outstanding: int, compute_ms: float | None = None) -> float:
    """Spare capacity from the heartbeat (CPU, memory) and queue pressure, which counts our own
    queued and in-flight rows and, once measured, how fast the node computes."""
    queue = queue_pressure(node, outstanding, compute_ms)
    return _clamp(1.0 - (0.35 * node.cpu_load + 0.15 * node.mem_load + 0.5 * queue))


def request_region(params: Mapping) -> str:
    """The region a request's data is in, as its `region` parameter names it ("": none)."""
    return str(params.get("region", "") or "")


def locality_score(node: NodeInfo, region: str) -> float:
    """Same region as the data: 1; cloud: 0.4; another edge site: 0.1. No region given: edge 0.6."""
    if not region:
        return 0.6 if node.tier == "edge" else 0.4
    if node.region == region:
        return 1.0
    return 0.4 if node.tier == "cloud" else 0.1


def model_score(node: NodeInfo, ctx: RequestContext) -> float:
    """The variant it would serve warm: 1; another variant of the model loaded: 0.5; cold: 0."""
    if ctx.key_on(node) in node.models:
        return 1.0
    if any(key.split(":", 1)[0] == ctx.model for key in node.models):
        return 0.5
    return 0.0


def network_score(rtt_ms: float | None) -> float:
    """1 at zero RTT, 0.5 at the 10 ms reference, unknown RTT: 0.5."""
    if rtt_ms is None:
        return 0.5
    return 1.0 / (1.0 + max(0.0, rtt_ms) / RTT_REFERENCE_MS)


def score(node: NodeInfo, ctx: RequestContext, spec: SchedulerSpec, outstanding: int,
          rtt_ms: float | None, compute_ms: float | None = None) -> NodeScore:
    parts = (resource_score(node, outstanding, compute_ms), locality_score(node, ctx.region),
             model_score(node, ctx), network_score(rtt_ms))
    weights = (spec.alpha, spec.beta, spec.gamma, spec.delta)
    total = sum(w * p for w, p in zip(weights, parts)) / (sum(weights) or 1.0)
    return NodeScore(node, total, *parts)


def rank(nodes: list[NodeInfo], ctx: RequestContext, spec: SchedulerSpec,
         outstanding: Mapping[str, int], rtt_ms: Mapping[str, float],
         compute_ms: Mapping[str, float] | None = None) -> list[NodeScore]:
    """Scores of every node, best first. Nodes at or above the threshold come first; when none
    qualifies, the cloud tier is preferred (the edge pool is too loaded, far or cold), then the
    rest by score."""
    compute_ms = compute_ms or {}
    scores = [score(n, ctx, spec, outstanding.get(n.node_id, 0), rtt_ms.get(n.node_id),
                    compute_ms.get(n.node_id)) for n in nodes]
    any_above = any(s.total >= spec.threshold for s in scores)

    def key(s: NodeScore):
        fallback_rank = 0 if any_above or s.node.tier == "cloud" else 1
        return (s.total < spec.threshold, fallback_rank, -s.total, s.node.node_id)
    return sorted(scores, key=key)


def spread(ranked: list[NodeScore], threshold: float, margin: float, limit: int) -> list[NodeInfo]:
    """The nodes one kind of request may be spread over (`ranked` best first, as `rank` gives):
    the best, then its peers (same tier and region) at or above the threshold scoring within
    `margin` of it, up to `limit`. A site scales out over its own nodes; the cloud and other
    sites stay failover targets, and a peer far behind (cold, loaded) gets none of it."""
    if not ranked:
        return []
    best = ranked[0]
    chosen = [best.node]
    for s in ranked[1:]:
        if len(chosen) >= limit or s.total < threshold or s.total < best.total - margin:
            break
        if (s.node.tier, s.node.region) == (best.node.tier, best.node.region):
            chosen.append(s.node)
    return chosen


def with_door_rows(own: Mapping[str, int], door_rows: Mapping[str, int], door_age_s: float | None,
                   max_age_s: float) -> Mapping[str, int]:
    """Rows outstanding per node as placement weighs them: the coordinator's own (`own`) plus the
    compiled front door's queued for and in flight to each node by its last report (`door_rows`,
    `door_age_s` old; None: no report yet). A report older than `max_age_s` counts for nothing:
    a door that stopped reporting (ended, hung) does not keep its last load on a node for good."""
    if door_age_s is None or door_age_s > max_age_s or not any(rows > 0 for rows in door_rows.values()):
        return own
    combined = dict(own)
    for node_id, rows in door_rows.items():
        if rows > 0:
            combined[node_id] = combined.get(node_id, 0) + rows
    return combined


def least_loaded(nodes: list[NodeInfo], outstanding: Mapping[str, int]) -> NodeInfo:
    """The least_loaded baseline: the fewest requests in flight at the node (its heartbeat) plus
    rows we have queued for it or sent it (`outstanding`: the coordinator's own and the front
    door's, `with_door_rows`), per CPU; then the lowest CPU load, then the smallest node id. The front door applies the same rule to its own rows
    (frontdoor/src/least_loaded.cc, each node's heartbeat from its route reply)."""
    return min(nodes, key=lambda n: ((n.inflight + outstanding.get(n.node_id, 0)) / max(1, n.cpus),
                                     n.cpu_load, n.node_id))


class Scheduler:
    """Applies a deployment's policy; keeps the small state round-robin (a turn per model, so
    one model's traffic does not move another's) and random need."""

    def __init__(self, seed: int | None = None):
        self._rr: dict[str, int] = {}
        self._rng = random.Random(seed)

    def choose(self, nodes: list[NodeInfo], ctx: RequestContext, spec: SchedulerSpec,
               outstanding: Mapping[str, int], rtt_ms: Mapping[str, float],
               exclude: Collection[str] = (), compute_ms: Mapping[str, float] | None = None,
               ) -> NodeInfo | None:
        pool = sorted((n for n in nodes if n.node_id not in exclude), key=lambda n: n.node_id)
        if not pool:
            return None
        if spec.policy == "round_robin":
            turn = self._rr[ctx.model] = self._rr.get(ctx.model, 0) + 1
            return pool[turn % len(pool)]
        if spec.policy == "random":
            return self._rng.choice(pool)
        if spec.policy == "least_loaded":
            return least_loaded(pool, outstanding)
        return rank(pool, ctx, spec, outstanding, rtt_ms, compute_ms)[0].node


def failover_stages(nodes: list[NodeInfo], failed: NodeInfo, cloud_fallback: bool) -> list[list[NodeInfo]]:
    """Where a request goes after `failed` fails, in order: edge neighbours in the same region,
    then the cloud tier (when the deployment allows it), then edges of other regions."""
    others = [n for n in nodes if n.node_id != failed.node_id]
    same_region = [n for n in others if n.tier == "edge" and n.region == failed.region]
    cloud = [n for n in others if n.tier == "cloud"] if cloud_fallback else []
    elsewhere = [n for n in others if n.tier == "edge" and n.region != failed.region]
    return [stage for stage in (same_region, cloud, elsewhere) if stage]
