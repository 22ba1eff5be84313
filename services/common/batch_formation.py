"""Batch formation, as pure functions of a queue: which queued requests may share a batch (their
`signature`), in what order they are served, which batch goes next (`form_batch`: Triton's
dynamic batcher rules) and when (`batch_ready`, `may_overlap`), and how a batch's answer is split
back (`split`). `batcher.Batcher` adds the asyncio mechanics; the front door applies the same
rules in C++ (frontdoor/src/formation.cc)."""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.common.deployment import BatchingSpec
from services.common.errors import CneiError, ErrorCode

if TYPE_CHECKING:
    from services.common.batcher import NodeCall

_sequence = itertools.count()

# The deployment's batching section (Triton's names) is the batcher's configuration.
BatchConfig = BatchingSpec


@dataclass(eq=False)  # identity: fields hold arrays, which have no truth value to compare by
class Pending:
    """One queued request: its inputs, priority level (Triton: lower is served first), deadline
    and the future its caller awaits."""

    inputs: dict[str, np.ndarray]
    size: int
    signature: tuple
    priority: int = 0
    deadline: float = float("inf")
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    seq: int = field(default_factory=lambda: next(_sequence))
    context: otel_context.Context | None = None  # the caller's trace context
    span: trace.Span | None = None  # `<component>.queue`: from enqueue to dispatch or drop
    waited: list[int] | None = None  # the caller's: gets the ns this request waited, when sent
    calls: list[NodeCall] | None = None  # the caller's: gets each call that carried this request

    def dequeued(self, outcome: str, batch_size: int = 0) -> None:
        """End the queue span once (sent in a batch of `batch_size`, or dropped)."""
        if self.span is None:
            return
        if self.span.is_recording():
            self.span.set_attributes({"cnei.outcome": outcome, "cnei.batch_size": batch_size})
        self.span.end()
        self.span = None


def signature(inputs: dict[str, np.ndarray]) -> tuple:
    """What must match for requests to share a batch: names, datatypes and non-batch dims."""
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()))


def _urgency(p: Pending) -> tuple[int, int]:
    return p.priority, p.seq


def order(queue: list[Pending]) -> list[Pending]:
    """Most urgent priority level first (lower number), then arrival order."""
    return sorted(queue, key=_urgency)


def fill(same: list[Pending], limit: int) -> list[Pending]:
    """The head (`same[0]`), then in order every request of `same` that still fits under `limit`
    rows (one that does not is skipped and stays queued; later, smaller ones may fit)."""
    batch, total = [same[0]], same[0].size
    for p in same[1:]:
        if total + p.size <= limit:
            batch.append(p)
            total += p.size
    return batch


@dataclass(frozen=True)
class BatchRules:
    """A batch config made ready once, when its batcher is made: `preferred` holds its preferred
    sizes of at most `max_batch_size`, largest first, each once (frontdoor/src/formation.cc,
    BatchRules)."""

    config: BatchConfig
    preferred: tuple[int, ...]

    @classmethod
    def of(cls, config: BatchConfig) -> BatchRules:
        sizes = {size for size in config.preferred_batch_sizes if size <= config.max_batch_size}
        return cls(config, tuple(sorted(sizes, reverse=True)))


@dataclass(eq=False)
class Candidates:
    """What a queue offers its most urgent request, formed once per wake-up: the requests that may
    batch with it (`same`, in serving order, the head first), their rows, when the oldest request
    of the queue was queued and, once `preferred_batch` has formed it, the preferred batch."""

    same: list[Pending]
    rows: int
    oldest: float
    preferred: list[Pending] | None = None
    preferred_formed: bool = False


def candidates(queue: list[Pending]) -> Candidates:
    """The candidates of a non-empty queue (in any order)."""
    head = min(queue, key=_urgency)
    same = order([p for p in queue if p.signature == head.signature])
    return Candidates(same, sum(p.size for p in same), min(p.enqueued for p in queue))


def preferred_batch(formed: Candidates, rules: BatchRules) -> list[Pending] | None:
    """The batch of the largest preferred size that `fill` makes exactly of the candidates, or
    None when it makes none; formed on the first call, kept in `formed` for the next."""
    if not formed.preferred_formed:
        formed.preferred_formed = True
        for size in rules.preferred:
            if size > formed.rows:  # more than are queued: fill cannot make it
                continue
            batch = fill(formed.same, size)
            if sum(p.size for p in batch) == size:
                formed.preferred = batch
                break
    return formed.preferred


def _delay_passed(formed: Candidates, config: BatchConfig, now: float) -> bool:
    return (now - formed.oldest) * 1e6 >= config.max_queue_delay_us


def gone(queue: list[Pending], now: float) -> list[Pending]:
    """The requests no longer waiting: their deadline passed, or their caller went away."""
    return [p for p in queue if p.deadline <= now or (p.future is not None and p.future.done())]


def take(queue: list[Pending], rules: BatchRules, now: float,
         formed: Candidates | None = None) -> tuple[list[Pending], list[Pending]]:
    """`form_batch` with the queue's rules, and its candidates when already formed (they are
    formed again of what is left when requests have gone)."""
    expired = gone(queue, now)
    live = [p for p in queue if p not in expired] if expired else queue
    if not live:
        return [], expired
    if formed is None or expired:
        formed = candidates(live)
    preferred = None if _delay_passed(formed, rules.config, now) else preferred_batch(formed, rules)
    return preferred or fill(formed.same, rules.config.max_batch_size), expired


def form_batch(queue: list[Pending], config: BatchConfig, now: float) -> tuple[list[Pending], list[Pending]]:
    """Pick the next batch from the queue: (batch, expired).

    Expired or cancelled requests are taken out and never sent. The batch starts with the most
    urgent request; of the requests of its signature (in priority order), it is the largest
    preferred size `fill` makes exactly (Triton's dynamic batcher) unless the oldest request has
    waited `max_queue_delay_us`; else the full batch: `fill` up to `max_batch_size`."""
    return take(queue, BatchRules.of(config), now)


def is_ready(formed: Candidates, rules: BatchRules, now: float) -> bool:
    """`batch_ready` over a queue's candidates."""
    config = rules.config
    if _delay_passed(formed, config, now) or formed.rows >= config.max_batch_size:
        return True
    return bool(rules.preferred) and (formed.rows > rules.preferred[0] or preferred_batch(formed, rules) is not None)


def batch_ready(queue: list[Pending], config: BatchConfig, now: float) -> bool:
    """Send now? When the oldest request has waited `max_queue_delay_us`; when the rows of the
    most urgent request's signature make a preferred size (`preferred_batch`); when they fill
    `max_batch_size`; or when they are more than every preferred size (none is reachable any
    more: the full batch goes)."""
    return bool(queue) and is_ready(candidates(queue), BatchRules.of(config), now)


def overlaps(formed: Candidates, last_rows: int, max_batch_size: int) -> bool:
    """`may_overlap` over a queue's candidates."""
    return formed.rows >= min(last_rows, max_batch_size)


def may_overlap(queue: list[Pending], last_rows: int, max_batch_size: int) -> bool:
    """With a batch in flight, may another go? Only once the rows that would batch with the most
    urgent request are as many as the last batch sent (or a full batch): it then waits at the
    node, ready to run when the node's compute frees, instead of cutting what a closed loop sends
    back into small batches that contend for the same cores. The front door applies the same
    rule (frontdoor/src/batcher.cc, MayOverlapLocked)."""
    return bool(queue) and overlaps(candidates(queue), last_rows, max_batch_size)


class UnsplittableBatch(CneiError):
    """A batch's answer that cannot be split back into its requests' rows: an output without
    the batch dimension, or with another number of rows than the batch sent."""

    code = ErrorCode.INTERNAL

    def __init__(self, model: str, output: str, shape: tuple, rows: int, requests: int):
        self.model, self.output, self.shape, self.rows = model, output, shape, rows
        super().__init__(f"model '{model}' answered a batch of {rows} rows ({requests} requests) with output "
                         f"'{output}' of shape {list(shape)}: it needs {rows} rows to be split between them")


def split(outputs: dict[str, np.ndarray], sizes: list[int], model: str = "") -> list[dict[str, np.ndarray]]:
    """Split batched outputs back into per-request outputs along axis 0; UnsplittableBatch when
    an output does not have one row per batch row."""
    rows = sum(sizes)
    for name, array in outputs.items():
        shape = np.shape(array)
        if not shape or shape[0] != rows:
            raise UnsplittableBatch(model, name, shape, rows, len(sizes))
    bounds = np.cumsum(sizes)[:-1]
    per_output = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: parts[i] for name, parts in per_output.items()} for i in range(len(sizes))]
