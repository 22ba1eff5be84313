"""One federated round: ask the chosen clients concurrently, keep the updates that arrive in
time and fit, aggregate them, evaluate the new global model."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from opentelemetry import trace

from services.common.errors import CneiError, ErrorCode, FailedPrecondition, InvalidArgument, Unavailable
from services.common.federated import LocalUpdate, Named, RoundTask, check_same_shapes, non_finite_tensors
from services.common.jobs import RoundRecord
from services.common.nodes import NodeInfo
from services.trainer.metrics import CLIENT_FAILURES
from services.trainer.strategy import FedAvg

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
TrainFn = Callable[[str, RoundTask, float], Awaitable[LocalUpdate]]
EvaluateFn = Callable[[Named], Awaitable[tuple[float, float]]]


class RoundFailed(Unavailable):
    """Fewer than min_clients usable updates came back."""

    def __init__(self, round_no: int, got: int, asked: int, min_clients: int, failures: dict[str, str]):
        self.failures = failures
        reasons = [f"{node}: {why}" for node, why in sorted(failures.items())]
        if asked < min_clients:  # fewer live clients than min_clients: the round could not be met
            reasons.append(f"only {asked} live client{'s' if asked != 1 else ''} to ask" if asked else "no live clients")
        detail = "; ".join(reasons)
        super().__init__(f"round {round_no}: {got} of {asked} clients answered, min_clients is "
                         f"{min_clients} ({detail})")


class AggregateNotFinite(FailedPrecondition):
    """The aggregated model holds NaN or infinite values (the server step overflowed float32, say
    a FedAvgM server_lr far too large): the job fails; nothing of the round is kept."""

    def __init__(self, round_no: int, strategy: str, tensors: list[str]):
        self.tensors = tensors
        super().__init__(f"round {round_no}: the {strategy} aggregate holds NaN or infinite values in {tensors} "
                         f"(every client update was finite: the server step diverged; lower server_lr)")


@dataclass
class RoundOutcome:
    weights: Named
    record: RoundRecord


async def _call_client(train: TrainFn, node: NodeInfo, task: RoundTask, timeout: float,
                       reference: Named) -> LocalUpdate:
    with _tracer.start_as_current_span("federated.client") as span:
        span.set_attributes({"cnei.node": node.node_id, "cnei.round": task.round})
        update = await train(node.address, task, timeout)
        check_same_shapes(reference, update.weights, f"update of {node.node_id}")
        bad = non_finite_tensors(update.weights)
        if bad:  # diverged: one such update would make the aggregate NaN
            raise InvalidArgument(f"update of {node.node_id} holds NaN or infinite values in {bad}")
        if update.num_samples <= 0:
            raise Unavailable(f"update of {node.node_id} covers no samples")
        span.set_attribute("cnei.samples", update.num_samples)
        return update


async def gather_updates(train: TrainFn, nodes: list[NodeInfo], task: RoundTask,
                         timeout: float) -> tuple[dict[str, LocalUpdate], dict[str, str]]:
    """(updates, failures) by node id; clients still busy at `timeout`, or when the round itself
    is cancelled, are cancelled. A client call cancelled under the round (grpc.aio raises
    CancelledError when the call's channel is closed) is that client's failure, not the round's."""
    tasks = {n.node_id: asyncio.create_task(_call_client(train, n, task, timeout, task.weights))
             for n in nodes}
    if tasks:
        try:
            await asyncio.wait(tasks.values(), timeout=timeout)
        except asyncio.CancelledError:  # the job stops: so do its clients' calls
            for t in tasks.values():
                t.cancel()
            raise
    updates, failures = {}, {}
    for node_id, t in tasks.items():
        if not t.done():
            t.cancel()
            failures[node_id] = f"no update within {timeout:g}s"
            CLIENT_FAILURES.labels("timeout").inc()
        elif t.cancelled():
            failures[node_id] = f"{ErrorCode.CANCELLED.value}: its call was cancelled (its channel closed)"
            CLIENT_FAILURES.labels(ErrorCode.CANCELLED.value).inc()
        elif t.exception() is not None:
            exc = t.exception()
            code = exc.code if isinstance(exc, CneiError) else ErrorCode.INTERNAL
            failures[node_id] = f"{code.value}: {exc}"
            CLIENT_FAILURES.labels(code.value).inc()
        else:
            updates[node_id] = t.result()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    return updates, failures


async def run_round(train: TrainFn, evaluate: EvaluateFn, strategy: FedAvg, nodes: list[NodeInfo],
                    task: RoundTask, min_clients: int, timeout: float, attempt: int = 1) -> RoundOutcome:
    """Train on `nodes`, aggregate what came back, evaluate; RoundFailed below min_clients."""
    start = time.perf_counter()
    with _tracer.start_as_current_span("federated.round") as span:
        span.set_attributes({"cnei.job": task.job_id, "cnei.round": task.round, "cnei.attempt": attempt,
                             "cnei.clients": len(nodes)})
        updates, failures = await gather_updates(train, nodes, task, timeout)
        for node_id, why in failures.items():
            log.warning("job %s round %d: dropped %s (%s)", task.job_id, task.round, node_id, why)
        if len(updates) < min_clients:
            raise RoundFailed(task.round, len(updates), len(nodes), min_clients, failures)
        ordered = [updates[k] for k in sorted(updates)]
        weights = strategy.aggregate(task.weights, [(u.weights, u.num_samples) for u in ordered])
        if bad := non_finite_tensors(weights):
            raise AggregateNotFinite(task.round, strategy.name, bad)
        accuracy, loss = await evaluate(weights)
        span.set_attributes({"cnei.participants": len(updates), "cnei.accuracy": accuracy})
    record = RoundRecord(round=task.round, participants=sorted(updates), failed=sorted(failures),
                         accuracy=accuracy, loss=loss, seconds=time.perf_counter() - start, attempt=attempt)
    return RoundOutcome(weights, record)
