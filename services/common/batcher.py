"""Dynamic batching: queue requests, send one batched call, split the answer. The coordinator
keeps a batcher per (variant, node); an edge runtime one per loaded variant, so requests that
reach it separately (its own OIP clients, several coordinators) share ONNX Runtime calls.

Batch formation is pure functions (`batch_formation`; a `Batcher` forms a queue's `candidates`
once per wake-up and its config's `BatchRules` once); `Batcher` adds the asyncio mechanics. The
queue parameters of a request (Triton's `priority`, `timeout_us`) are read by `priority_level`
and `request_deadline`."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from services.common import lifecycle, telemetry
from services.common.background import Background
from services.common.batch_formation import (BatchConfig, BatchRules, Candidates, Pending, UnsplittableBatch,
                                              candidates, gone, is_ready, may_overlap, overlaps, signature, split,
                                              take)
from services.common.errors import CneiError, DeadlineExceeded, InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
Send = Callable[[dict[str, np.ndarray], int, float], Awaitable[dict[str, np.ndarray]]]

# Recorded by every process that batches: a coordinator (batches it sends to a node) and a runtime
# (batches it runs in one ONNX Runtime call); each process's /metrics holds its own.
BATCH_SIZE = Histogram("cnei_batch_size", "Samples per batch this process sent on (coordinator: to a node; "
                       "runtime: to one ONNX Runtime call)", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
QUEUE_TIME = Histogram("cnei_batch_queue_seconds", "Time a request waited in a batcher queue", ["model"],
                       buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1))
DROPPED = Counter("cnei_batch_dropped_total", "Requests removed from a queue before sending",
                  ["model", "reason"])


DEFAULT_PRIORITY_LEVEL = 1 << 30  # Triton: 0 means "default level", served after explicit levels
UINT64_MAX = 2 ** 64 - 1  # the largest priority (Triton's is a uint64)



def number_param(params: dict, key: str, kind: type[int] | type[float]) -> int | float:
    """A numeric request parameter; one that is not a finite number (or not a non-negative one,
    for a timeout) is the client's error."""
    try:
        value = kind(params.get(key, 0) or 0)
    except (TypeError, ValueError):
        raise InvalidArgument(f"parameter '{key}' must be a number, got {params[key]!r}") from None
    except OverflowError:  # int(inf)
        raise InvalidArgument(f"parameter '{key}' must be a finite number, got {params[key]!r}") from None
    if not math.isfinite(value):
        raise InvalidArgument(f"parameter '{key}' must be a finite number, got {params[key]!r}")
    if key.startswith("timeout") and value < 0:
        raise InvalidArgument(f"parameter '{key}' must not be negative, got {params[key]!r}")
    return value


def request_deadline(params: dict, deadline_s: float | None, default_s: float) -> float:
    """Absolute monotonic deadline: the earliest of the gRPC deadline, the request's timeout in
    microseconds (`timeout_us`, or `timeout` as tritonclient's `infer(timeout=...)` and Triton's
    gRPC protocol name it) and the default."""
    now = time.monotonic()
    candidates = [now + (deadline_s if deadline_s is not None else default_s)]
    timeout_us = number_param(params, "timeout_us", float) or number_param(params, "timeout", float)
    if timeout_us:
        candidates.append(now + timeout_us / 1e6)
    return min(candidates)


def priority_level(params: dict) -> int:
    """The request's queue level: Triton's `priority`, a uint64 (0 or absent: the default level);
    a negative, fractional or too large number, or a boolean, is the client's error."""
    raw = params.get("priority")
    value = raw if isinstance(raw, int) and not isinstance(raw, bool) else number_param(params, "priority", float)
    if isinstance(raw, bool) or value != int(value) or not 0 <= value <= UINT64_MAX:
        raise InvalidArgument(f"parameter 'priority' must be an integer from 0 to {UINT64_MAX}, got {raw!r}")
    return int(value) or DEFAULT_PRIORITY_LEVEL


def level_words(level: int) -> str:
    """'priority 3', or 'the default priority' for requests without one."""
    return "the default priority" if level in (0, DEFAULT_PRIORITY_LEVEL) else f"priority {level}"


class BatchOutputs(dict):
    """What `send` may return instead of a plain dict of outputs: `info` (about the batch as a
    whole, e.g. its compute time) then reaches every caller of the batch with its own rows."""

    def __init__(self, outputs: dict[str, np.ndarray], info: object):
        super().__init__(outputs)
        self.info = info


@dataclass(eq=False)
class NodeCall:
    """One call a batcher sent (a batch, or a request of a failed batch sent again alone), as its
    requests' callers see it: `booked` is theirs to note that one of them said what it showed of
    the node (the coordinator books one breaker verdict per call, not one per request)."""

    requests: int
    booked: bool = False


class Batcher:
    """Queue + worker for one (variant, node); `submit` resolves with that request's outputs."""

    def __init__(self, model: str, config: BatchConfig, send: Send, component: str = "coordinator",
                 retry_alone: bool | Callable[[Exception], bool] = False):
        self.model = model
        self.component = component  # names the spans: `{component}.queue`, `{component}.batch`
        # A failed batch of several requests is sent again one request at a time, so one bad
        # request fails alone: every failure (a runtime: the call's error is about its inputs), or
        # those the predicate picks (a coordinator: errors about a request; it leaves node failures
        # to failover)
        self.retry_alone = retry_alone
        self.config = config
        self._rules = BatchRules.of(config)
        self.send = send
        self.queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(config.max_inflight_batches)
        self._task = asyncio.create_task(self._run(), name=f"batcher-{model}")
        self._inflight = Background()
        self._running = 0  # batches sent and not yet answered
        self._last_rows = 0  # rows of the batch sent last
        self._queue_time, self._batch_size = QUEUE_TIME.labels(model), BATCH_SIZE.labels(model)
        self._closed: CneiError | None = None  # once closed: what a request submitted then is told

    async def submit(self, inputs: dict[str, np.ndarray], priority: int = 0, deadline: float = float("inf"),
                     waited: list[int] | None = None, calls: list[NodeCall] | None = None) -> dict[str, np.ndarray]:
        """The request's outputs once its batch is answered; `waited`, when given, gets the
        nanoseconds it waited in the queue appended when it is sent; `calls`, each node call
        that carried it (the last one answered it)."""
        if self._closed is not None:
            raise self._closed
        now = time.monotonic()  # requests cancelled or expired while a batch is in flight hold no slot
        self._drop(gone(self.queue, now))
        if sum(p.priority == priority for p in self.queue) >= self.config.max_queue_size:
            DROPPED.labels(self.model, "queue_full").inc()  # Triton: each priority level's queue has its own bound
            raise ResourceExhausted(
                f"queue of model '{self.model}' is full ({self.config.max_queue_size} requests) "
                f"at {level_words(priority)}")
        size = next(iter(inputs.values())).shape[0] if inputs else 1
        item = Pending(inputs, int(size), signature(inputs), priority, deadline,
                       future=asyncio.get_running_loop().create_future(),
                       context=otel_context.get_current(),
                       span=None if telemetry.unsampled() else
                       _tracer.start_span(f"{self.component}.queue", attributes={"cnei.model": self.model}),
                       waited=waited, calls=calls)
        if self._idle(item) and deadline > time.monotonic():  # nothing to wait for or batch with: send now
            await self._slots.acquire()  # free, so this returns at once
            await self._dispatch(self._started([item]))
            return item.future.result()
        self.queue.append(item)
        self._wake.set()
        timeout = None if deadline == float("inf") else max(0.0, deadline - time.monotonic())
        try:  # cancellation of the caller, or its deadline, cancels the future: never sent
            return await asyncio.wait_for(item.future, timeout)
        except asyncio.TimeoutError:  # its timeout ended it, though the timer may fire a little early (uvloop: ms)
            if any(p is item for p in self.queue):
                self._drop([item], "deadline")
            raise DeadlineExceeded(
                f"request for model '{self.model}' passed its deadline after "
                f"{(time.monotonic() - item.enqueued) * 1e3:.1f} ms in the batcher") from None
        finally:  # not sent yet: its slot in the queue is freed at once
            if any(p is item for p in self.queue):
                self._drop([item])

    def _idle(self, item: Pending) -> bool:
        """`item`, arriving now, would be sent alone at once anyway: empty queue, a free
        in-flight slot, no queue delay to wait out and no batch in flight it may not overlap."""
        return (not self.queue and not self._slots.locked() and self.config.max_queue_delay_us == 0
                and (self._running == 0 or may_overlap([item], self._last_rows, self.config.max_batch_size)))

    async def _run(self) -> None:
        while True:
            while not self.queue:  # hold no in-flight slot while idle: `submit` may use it directly
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            self._inflight.spawn(self._dispatch(self._started(batch)))

    async def _next_batch(self) -> list[Pending]:
        while True:
            now = time.monotonic()
            self._drop([p for p in self.queue if p.deadline <= now])  # expire while waiting for a batch
            formed = candidates(self.queue) if self.queue else None  # once per wake-up
            ready = formed is not None and is_ready(formed, self._rules, now)
            # a ready batch waits for the one in flight (which wakes this when it is answered)
            # unless none is, or it is at least as big as that one
            held = ready and not (self._running == 0 or
                                  overlaps(formed, self._last_rows, self.config.max_batch_size))
            if ready and not held:
                batch, expired = take(self.queue, self._rules, now, formed)
                self._drop(expired)
                if batch:
                    taken = {id(p) for p in batch}
                    self.queue = [p for p in self.queue if id(p) not in taken]
                    return batch
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._wait_time(now, formed, queue_delay=not held))
            except asyncio.TimeoutError:
                pass

    def _wait_time(self, now: float, formed: Candidates | None, queue_delay: bool) -> float | None:
        """Sleep until the head's delay passes (when `queue_delay`; `formed`: the queue's
        candidates, None when it is empty) or the nearest deadline, whichever first."""
        if formed is None:
            return None
        wake = min(p.deadline for p in self.queue)
        if queue_delay:
            wake = min(wake, formed.oldest + self.config.max_queue_delay_us / 1e6)
        return None if wake == float("inf") else max(0.0, wake - now)

    def _started(self, batch: list[Pending]) -> list[Pending]:
        """Count `batch` in flight until `_dispatch` ends (see may_overlap)."""
        self._running += 1
        self._last_rows = sum(p.size for p in batch)
        return batch

    def _drop(self, expired: list[Pending], reason: str = "") -> None:
        """Take `expired` out of the queue, counted under `reason` (default: "deadline" for those
        past their deadline, "cancelled" for the others)."""
        if not expired:
            return
        gone = {id(p) for p in expired}
        self.queue = [p for p in self.queue if id(p) not in gone]
        now = time.monotonic()
        for p in expired:
            why = reason or ("deadline" if p.deadline <= now else "cancelled")
            DROPPED.labels(self.model, why).inc()
            p.dequeued(why)
            if p.future is not None and not p.future.done():
                p.future.set_exception(DeadlineExceeded(
                    f"request for model '{self.model}' timed out after waiting "
                    f"{(now - p.enqueued) * 1e3:.1f} ms in the queue"))

    async def _dispatch(self, batch: list[Pending]) -> None:
        try:
            for p in batch:
                if p.future.done():
                    p.dequeued("cancelled")
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            now = time.monotonic()
            sizes = [p.size for p in live]
            total = sum(sizes)
            for p in live:
                self._queue_time.observe(now - p.enqueued)
                if p.waited is not None:
                    p.waited.append(int((now - p.enqueued) * 1e9))
                p.dequeued("sent", total)
            self._batch_size.observe(total)
            call = NodeCall(len(live))
            for p in live:
                if p.calls is not None:
                    p.calls.append(call)
            if len(live) == 1:
                inputs = live[0].inputs
            else:
                inputs = {n: np.concatenate([p.inputs[n] for p in live]) for n in live[0].inputs}
            try:
                with telemetry.child_span(
                    _tracer, f"{self.component}.batch", context=live[0].context,
                    links=[trace.Link(trace.get_current_span(p.context).get_span_context())
                           for p in live[1:] if p.context is not None],
                ) as span:
                    span.set_attributes({"cnei.model": self.model, "cnei.batch_size": total,
                                         "cnei.batch_requests": len(live)})
                    outputs = await self.send(inputs, total, max(p.deadline for p in live))
                parts = self._parts(outputs, sizes)
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                if len(live) > 1 and self._retries_alone(exc):
                    await self._one_by_one(live, exc)
                    return
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            for p, part in zip(live, parts):
                if not p.future.done():
                    p.future.set_result(part)
        finally:
            self._running -= 1
            self._slots.release()
            self._wake.set()

    def _retries_alone(self, error: Exception) -> bool:
        """Whether a failed batch's requests are sent again one by one after `error`."""
        return self.retry_alone(error) if callable(self.retry_alone) else self.retry_alone

    def _parts(self, outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
        """Each request's share of the batch's `outputs` (with the batch's `info`, if any)."""
        if len(sizes) == 1:
            return [outputs]
        try:
            parts = split(outputs, sizes, self.model)
        except UnsplittableBatch as exc:
            log.error("%s", exc.message)
            raise
        info = getattr(outputs, "info", None)
        return parts if info is None else [BatchOutputs(part, info) for part in parts]

    async def _one_by_one(self, live: list[Pending], error: Exception) -> None:
        """The batch failed (`error`): each request is sent alone and gets its own outcome."""
        log.warning("batch of %d requests for model '%s' failed (%s); sending them one by one",
                    len(live), self.model, error)
        for p in live:
            if p.future.done():
                continue
            if p.calls is not None:
                p.calls.append(NodeCall(1))
            try:
                result = await self.send(p.inputs, p.size, p.deadline)
            except Exception as exc:  # noqa: BLE001 - this request's own failure
                if not p.future.done():
                    p.future.set_exception(exc)
            else:
                if not p.future.done():
                    p.future.set_result(result)

    async def drain_and_close(self, timeout_s: float = 60.0) -> None:
        """Serve what is queued and in flight, then stop (used when a batcher is replaced)."""
        deadline = time.monotonic() + timeout_s
        while (self.queue or self._inflight.tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await self.close()

    async def close(self, error: CneiError | None = None) -> None:
        """Stop: requests still queued, and any submitted from now on, fail with `error` (default
        RESOURCE_EXHAUSTED); batches in flight are waited for."""
        self._closed = error or ResourceExhausted(f"batcher of model '{self.model}' closed")
        await lifecycle.cancel_and_wait(self._task)
        queued, self.queue = self.queue, []
        for p in queued:
            p.dequeued("closed")
            if p.future is not None and not p.future.done():
                p.future.set_exception(self._closed)
        await asyncio.gather(self._inflight.wait(), return_exceptions=True)
