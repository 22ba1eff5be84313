"""The compiled front door's reports, booked as if the full path had served their requests:
Triton's statistics, metrics, the node's RTT, compute time and latency, its circuit breakers."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import Counter

from services.common.batcher import DROPPED, QUEUE_TIME
from services.common.errors import AttemptTimedOut, ErrorCode
from services.common.oip_operations import record_inference
from services.coordinator.breaker import Verdict, verdict
from services.coordinator.core import count_served
from services.coordinator.response_cache import CACHE_EVENTS

if TYPE_CHECKING:
    from services.common.stats import ModelStats
    from services.coordinator.core import Coordinator
    from services.coordinator.door import Route

log = logging.getLogger(__name__)
DOOR_REQUESTS = Counter("cnei_front_door_requests_total",
                        "Requests the compiled front door answered itself, or handed to the full path "
                        "after a failed node call", ["model", "outcome"])
_door_requests = functools.lru_cache(maxsize=None)(DOOR_REQUESTS.labels)


@dataclass(frozen=True)
class BatchReport:
    rows: int
    requests: int
    duration_ns: int
    compute_ns: int


@dataclass
class RouteReport:
    route_id: int
    request_ns: list[int] = field(default_factory=list)
    request_rows: list[int] = field(default_factory=list)
    batches: list[BatchReport] = field(default_factory=list)
    handed_over: int = 0
    failure: str = ""
    queue_ns: list[int] = field(default_factory=list)  # per request, same order as request_ns
    cache_hit_request_ns: list[int] = field(default_factory=list)  # requests answered from the door's cache
    cache_hit_rows: list[int] = field(default_factory=list)
    cache_hit_ns: int = 0  # lookups that answered
    cache_misses: int = 0
    cache_miss_ns: int = 0  # lookups that did not, with the inserts of the nodes' answers
    failed_request_ns: list[int] = field(default_factory=list)  # requests the door refused itself
    failed_codes: list[str] = field(default_factory=list)  # their status codes, same order
    # why the door took each out of its queue unsent (queue_full, deadline, cancelled), "" after a node call
    failed_dropped: list[str] = field(default_factory=list)


def failure_code(failure: str) -> ErrorCode:
    """The code of a door failure text such as 'UNAVAILABLE: connection lost'."""
    return ErrorCode.__members__.get(failure.split(":", 1)[0].strip(), ErrorCode.INTERNAL)


def failure_reason(route: Route, failure: str) -> str:
    """What a node call the door reports failed says of the node, worded as the full path words
    it: the route's limit passing (DEADLINE_EXCEEDED: the door reports no call its client's own
    deadline ended) as an attempt limit, the node named by its id, not its fast-lane address."""
    node = route.placement.node
    if failure_code(failure) is ErrorCode.DEADLINE_EXCEEDED:
        return AttemptTimedOut(node.node_id, route.placement.variant.key, route.timeout_ms / 1e3).message
    return failure.replace(node.fast_address, f"node {node.node_id}") if node.fast_address else failure


def book_requests(core: Coordinator, route: Route, report: RouteReport) -> None:
    """What the door served by the route, booked as the full path books its requests: Triton's
    statistics, the request, cache and queue metrics."""
    stats = core.stats.get(*route.stats_key)
    queued = report.queue_ns if len(report.queue_ns) == len(report.request_ns) else [0] * len(report.request_ns)
    for ns, rows, queue_ns in zip(report.request_ns, report.request_rows, queued):
        stats.record(True, ns, rows, queue_ns=queue_ns, executed=False)
        record_inference(route.model, "ok", ns / 1e9)
    for batch in report.batches:  # Triton's executions: the node calls, with the node's compute time
        stats.execution(batch.rows, batch.compute_ns)
    for ns, rows in zip(report.cache_hit_request_ns, report.cache_hit_rows):
        stats.record(True, ns, rows, executed=False, cache_hit=True)
        record_inference(route.model, "ok", ns / 1e9)
    hits = len(report.cache_hit_request_ns)
    stats.cache_hit.count += hits
    stats.cache_hit.ns += report.cache_hit_ns
    stats.cache_miss.count += report.cache_misses
    stats.cache_miss.ns += report.cache_miss_ns
    if hits:
        CACHE_EVENTS.labels(route.stats_key[0], "hit").inc(hits)
    if report.cache_misses:
        CACHE_EVENTS.labels(route.stats_key[0], "miss").inc(report.cache_misses)
    queue_time = QUEUE_TIME.labels(route.model)
    for ns in report.queue_ns:
        queue_time.observe(ns / 1e9)
    answered = len(report.request_ns) + hits
    if answered:
        count_served(route.stats_key[0], "ok", route.response.parameters, answered)
        _door_requests(route.model, "ok").inc(answered)
    if report.handed_over:
        _door_requests(route.model, "handed_over").inc(report.handed_over)
    book_refusals(route, report, stats)


def book_refusals(route: Route, report: RouteReport, stats: ModelStats) -> None:
    """The door's own refusals, booked as the full path books its failures: no node or variant
    named (count_served), and those it took out of its queue unsent in cnei_batch_dropped_total."""
    dropped = report.failed_dropped + [""] * (len(report.failed_request_ns) - len(report.failed_dropped))
    for ns, code, reason in zip(report.failed_request_ns, report.failed_codes, dropped):
        stats.record(False, ns)
        record_inference(route.model, code.lower(), ns / 1e9)
        count_served(route.stats_key[0], code.lower())
        _door_requests(route.model, code.lower()).inc()
        if reason:
            DROPPED.labels(route.model, reason).inc()


def book_calls(core: Coordinator, route: Route, report: RouteReport) -> None:
    """The node's RTT, compute time and latency, and its breakers."""
    node, model = route.placement.node, route.placement.variant.key
    for b in report.batches:
        core.nodes.observe_rtt(node.node_id, (b.duration_ns - b.compute_ns) / 1e6)
        if b.compute_ns:
            core.nodes.observe_compute(node.node_id, b.compute_ns / 1e6 / max(1, b.rows))
        core.latency.add((route.placement.variant.name, node.node_id), b.duration_ns / 1e9)
    if report.failure:
        reason = failure_reason(route, report.failure)
        log.warning("front door: node %s failed for %s: %s", node.node_id, model, reason)
        # the door reports a failure of a call the node had (not one its client's own deadline ended)
        core.breakers.record(node.node_id, model, verdict(failure_code(report.failure)), reason)
    elif report.batches:
        core.breakers.record(node.node_id, model, Verdict.ANSWERED)
