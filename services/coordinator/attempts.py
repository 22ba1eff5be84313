"""A request's attempts at its nodes: one node at a time, failing over to another after a node's
own failure, a hedged copy to a second node when the first is slow; each attempt's verdict of its
node settles its claim on the breakers."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np
from opentelemetry import trace
from prometheus_client import Counter

from services.common import events, oip
from services.common.background import Background
from services.common.batcher import NodeCall, priority_level, request_deadline
from services.common.deployment import DeploymentSpec
from services.common.errors import AttemptTimedOut, CneiError, DeadlineExceeded, ErrorCode, NoLiveNode, Unavailable
from services.common.model_spec import ModelVariant, check_inputs, check_outputs
from services.common.nodes import NodeInfo
from services.coordinator.attempt_limit import attempt_limit_s, call_rows
from services.coordinator.breaker import Breakers, Claim, Verdict, verdict
from services.coordinator.latency import LatencyBook
from services.coordinator.node_batchers import NodeBatchers
from services.coordinator.placement import request_region
from services.coordinator.placer import Placement, Placer, node_class
from services.coordinator.precision import PrecisionPolicy, request_policy
from services.coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
# A node's own failures (breaker.NODE_VERDICTS: down, slow, faulty): another node may answer, so
# the request fails over (inference is idempotent); any other error is the request's own
RETRYABLE = {ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.INTERNAL}
FAILOVERS = Counter("cnei_failovers_total", "Requests moved to another node after a failure",
                    ["model", "from_tier", "to_tier", "reason"])
# A DEADLINE_EXCEEDED this long or more before the request's deadline is the node's (it gave up),
# not the client's: the node was sent the time left, so its own expiry lands on the deadline
CLIENT_DEADLINE_SLACK_S = 0.01
HEDGES = Counter("cnei_hedged_requests_total", "Requests sent a second time to another node", ["model"])
# The request being served collects here the ns each of its node calls waited in a batcher (every
# attempt: failover, hedging, joint escalation), booked as its queue time (Triton's `queue`)
queued_ns: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("cnei_queued_ns", default=None)
Announce = Callable[[str, dict], Awaitable[None]]


def once_per_call(outcome: Verdict, calls: list[NodeCall]) -> Verdict:
    """What an attempt books of its node: a failure (slow, faulty, down) once per node call, by
    the first of the requests the call carried (the last of `calls`) to say so, the others
    SILENT (a failed batch of three is one failure, as the front door books it); an answer
    always (idempotent)."""
    if outcome in (Verdict.ANSWERED, Verdict.SILENT) or not calls:
        return outcome
    if calls[-1].booked:
        return Verdict.SILENT
    calls[-1].booked = True
    return outcome


class Attempts:
    """Tries a request at the nodes `placer` chooses, through their `node_batchers`: each
    attempt's rows count in `outstanding` while it runs, its time in `latency`; a failover is
    noted in `recent` and announced."""

    def __init__(self, settings: CoordinatorSettings, placer: Placer, breakers: Breakers,
                 node_batchers: NodeBatchers, outstanding: dict[str, int], latency: LatencyBook,
                 recent: deque[dict], background: Background, announce: Announce):
        self.settings = settings
        self.placer = placer
        self.breakers = breakers
        self.node_batchers = node_batchers
        self.outstanding = outstanding
        self.latency = latency
        self.recent = recent
        self._background = background
        self.announce = announce

    async def serve(self, request: oip.InferRequest, variants: list[ModelVariant], spec: DeploymentSpec,
                    deadline_s: float | None) -> tuple[dict[str, np.ndarray], Placement]:
        """`request`'s outputs and the placement that answered: one node at a time (each try
        hedged, `_hedged`), failing over to another after a node's own failure (`RETRYABLE`),
        until `max_attempts`, the deadline or the nodes run out. The last try (no node left to
        fail over to, or `max_attempts` reached) waits until the deadline."""
        params = request.parameters
        policy = request_policy(params, spec)
        deadline = request_deadline(params, deadline_s, self.settings.forward_timeout_s)
        priority_level(params)  # a priority that is no uint64 is refused before any node is tried
        check_inputs(variants[0], request.inputs)  # every precision variant shares the interface
        check_outputs(variants[0], request.outputs)
        region = request_region(params)
        tried: list[str] = []
        failed: NodeInfo | None = None
        last_error: CneiError | None = None
        attempts = max(1, self.settings.max_attempts)
        for attempt in range(attempts):
            if time.monotonic() >= deadline:
                break
            placement = self.placer.decide(variants, spec, policy, region, failed, tried)
            if placement is None:
                break
            if failed is not None:
                self._record_failover(request.model_name, failed, placement.node, last_error)
            tried.append(placement.node.node_id)
            last = attempt == attempts - 1 or not self.placer.others_left(variants, spec, policy, tried)
            try:
                outputs, placement = await self._hedged(request, placement, spec, deadline,
                                                        variants, policy, region, tried, last)
            except CneiError as exc:
                if exc.code not in RETRYABLE:
                    raise
                last_error, failed = exc, placement.node
                log.warning("node %s failed for %s: %s", placement.node.node_id,
                            placement.variant.key, exc.message)
                continue
            return outputs, placement
        if last_error is not None and time.monotonic() < deadline:
            raise last_error
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"deadline passed before model '{request.model_name}' could be served")
        raise NoLiveNode(request.model_name, self.placer.out_of_use(spec, region, [v.key for v in variants]))

    def _hedge_delay(self, spec: DeploymentSpec, placement: Placement) -> float | None:
        if spec.hedge_after_ms > 0:
            return spec.hedge_after_ms / 1e3
        if spec.hedge_after_ms == -1:
            return self.latency.quantile((placement.variant.name, placement.node.node_id), 0.95)
        return None

    async def _hedged(self, request: oip.InferRequest, placement: Placement, spec: DeploymentSpec,
                      deadline: float, variants: list[ModelVariant], policy: PrecisionPolicy,
                      region: str, tried: list[str], last: bool = False) -> tuple[dict[str, np.ndarray], Placement]:
        """Send a second copy to another node when the first has not answered after the hedge
        delay; the first success wins and the other copy is cancelled, as is every copy when the
        caller gives up. `last`: no other node is left to try after this one."""
        claim = self._claim(placement)  # before anything awaits: no other request takes the probe
        delay = self._hedge_delay(spec, placement)
        if delay is None:  # no hedging: no task either
            return await self._attempt(request, placement, spec, deadline, claim, last), placement
        first = self._start(request, placement, spec, deadline, claim, last)
        owners = {first: placement}
        try:
            done, _ = await asyncio.wait({first}, timeout=delay)
            hedge = None if done else self._hedge(variants, spec, policy, region, tried)
            if hedge is None:
                return await first, placement
            HEDGES.labels(request.model_name).inc()
            tried.append(hedge[0].node.node_id)
            owners[self._start(request, hedge[0], spec, deadline, hedge[1])] = hedge[0]
            pending = set(owners)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        return task.result(), owners[task]
            raise first.exception()
        finally:
            for task in owners:
                task.cancel()  # the loser, or every copy of a request its caller gave up

    def _hedge(self, variants: list[ModelVariant], spec: DeploymentSpec, policy: PrecisionPolicy,
               region: str, tried: list[str]) -> tuple[Placement, Claim] | None:
        """Where a hedged copy goes, its node's call claimed; None when no other node may take it."""
        try:
            placement = self.placer.choose(variants, spec, policy, region, self.placer.eligible_nodes(spec), tried)
        except CneiError as exc:  # a hedge is extra: the first copy still runs
            log.warning("no hedge for %s: %s", variants[0].key, exc.message)
            return None
        if placement is None:
            return None
        claim = self.breakers.claim(placement.node.node_id, placement.variant.key)
        return None if claim is None else (placement, claim)

    def _claim(self, placement: Placement) -> Claim:
        """A call of the placement's variant to its node, claimed on their breakers; UNAVAILABLE
        when either lets none through."""
        node_id, model = placement.node.node_id, placement.variant.key
        claim = self.breakers.claim(node_id, model)
        if claim is None:
            why = self.breakers.reason(node_id, model) or "circuit breaker open"
            raise Unavailable(f"node {node_id} is out of use ({why})")
        return claim

    def probe(self, request: oip.InferRequest, placement: Placement, spec: DeploymentSpec) -> bool:
        """Send `request` (zero inputs of a front-door route's shape) to the placement's node as the
        half-open probe of its breaker, or of its breaker of the variant, when one may go now; its
        verdict settles the claim as any attempt's does. The door sends a node on trial nothing, so
        a peer the full path never chooses first would otherwise never be probed. False when no
        probe went."""
        claim = self.breakers.claim(placement.node.node_id, placement.variant.key)
        if claim is None:
            return False
        if not (claim.probe or claim.model_probe):  # closed meanwhile: nothing to probe
            claim.settle(Verdict.SILENT)
            return False
        log.info("probing node %s for %s", placement.node.node_id, placement.variant.key)
        self._start(request, placement, spec, time.monotonic() + self.settings.forward_timeout_s, claim)
        return True

    def _start(self, request: oip.InferRequest, placement: Placement, spec: DeploymentSpec, deadline: float,
               claim: Claim, last: bool = False) -> asyncio.Task:
        """An attempt as a task of its own (hedging); its claim settles even if it never runs."""
        task = self._background.spawn(self._attempt(request, placement, spec, deadline, claim, last))

        def ended(t: asyncio.Task) -> None:
            claim.settle(Verdict.SILENT)  # no-op once the attempt settled it
            if not t.cancelled():
                t.exception()  # retrieved: `_hedged` answers with one copy's error at most
        task.add_done_callback(ended)
        return task

    async def _attempt(self, request: oip.InferRequest, placement: Placement, spec: DeploymentSpec,
                       deadline: float, claim: Claim, last: bool = False) -> dict[str, np.ndarray]:
        """One node's try, bounded by its attempt limit (`attempt_limit`) unless it is the `last`
        (then by the request's deadline alone); what it says of the node (`breaker.verdict`)
        settles its claim on the node's breakers. A DEADLINE_EXCEEDED before the request's own
        deadline is the node's failure: UNAVAILABLE naming it (`AttemptTimedOut`)."""
        node = placement.node
        limit = attempt_limit_s(spec, placement.variant, node_class(node),
                                call_rows(spec, placement.variant, request.rows))
        attempt_deadline = deadline if last else min(deadline, time.monotonic() + limit)
        start = time.perf_counter()
        rows = request.rows
        waited: list[int] = []  # the batcher notes the queue wait when it sends: the node had the request
        calls: list[NodeCall] = []  # and the node calls that carried it
        outcome, reason = Verdict.SILENT, ""
        self.outstanding[node.node_id] = self.outstanding.get(node.node_id, 0) + rows
        try:
            outputs = await self.node_batchers.batcher(placement, spec).submit(
                request.inputs, priority_level(request.parameters), attempt_deadline, waited, calls)
            outcome = Verdict.ANSWERED
        except CneiError as exc:
            nodes_own = attempt_deadline < deadline or time.monotonic() < deadline - CLIENT_DEADLINE_SLACK_S
            outcome, reason = verdict(exc.code, bool(waited), nodes_own), exc.message
            if exc.code is ErrorCode.DEADLINE_EXCEEDED and nodes_own:
                timed_out = AttemptTimedOut(node.node_id, placement.variant.key,
                                            limit if attempt_deadline < deadline else None, bool(waited), exc.message)
                reason = timed_out.message
                raise timed_out from None
            raise
        finally:
            claim.settle(once_per_call(outcome, calls), reason)
            left = self.outstanding.get(node.node_id, 0) - rows
            if left > 0:
                self.outstanding[node.node_id] = left
            else:
                self.outstanding.pop(node.node_id, None)
            queued = queued_ns.get()
            if queued is not None:
                queued.extend(waited)
        self.latency.add((placement.variant.name, node.node_id), time.perf_counter() - start)
        return outputs

    def _record_failover(self, model: str, failed: NodeInfo, to: NodeInfo, error: CneiError | None) -> None:
        reason = error.code.value if error else "unknown"
        FAILOVERS.labels(model, failed.tier, to.tier, reason).inc()
        with _tracer.start_as_current_span("coordinator.failover") as span:
            span.set_attributes({"cnei.model": model, "cnei.failover.from": failed.node_id,
                                 "cnei.failover.to": to.node_id, "cnei.failover.reason": reason})
        self.recent.append({"kind": "failover", "time": time.time(), "model": model,
                            "from": failed.node_id, "to": to.node_id, "reason": reason})
        payload = {"model": model, "from_node": failed.node_id, "from_tier": failed.tier,
                   "to_node": to.node_id, "to_tier": to.tier, "reason": reason,
                   "detail": error.message if error else ""}
        self._background.spawn(self.announce(events.REQUEST_FAILOVER, payload))
