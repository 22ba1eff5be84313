"""Dynamic batching: when a batch closes, what goes in it, in which order, and what callers get."""
from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
import uvloop
from prometheus_client import REGISTRY

from services.common.batch_formation import (BatchConfig, BatchRules, Pending, UnsplittableBatch, batch_ready,
                                             candidates, form_batch, is_ready, may_overlap, preferred_batch, signature,
                                             split, take)
from services.common.batcher import DEFAULT_PRIORITY_LEVEL, Batcher, BatchOutputs
from services.common.errors import DeadlineExceeded, ErrorCode, ResourceExhausted, Unavailable

FOREVER_US = 60_000_000  # a queue delay no test waits for
PATIENCE_S = 10.0  # generous bound on anything that should happen "at once"
BLOCKER = -1.0


class FakeNode:
    """A `send` that records every batch it gets, answers y = 10·x, and can be held shut."""

    def __init__(self):
        self.batches: list[dict[str, np.ndarray]] = []
        self.deadlines: list[float] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.called = asyncio.Event()
        self.failures: dict[int, Exception] = {}  # batch number -> what its send raises

    async def __call__(self, inputs: dict[str, np.ndarray], size: int, deadline: float) -> dict[str, np.ndarray]:
        assert size == len(inputs["x"])
        number = len(self.batches)
        self.batches.append(inputs)
        self.deadlines.append(deadline)
        self.called.set()
        await self.gate.wait()
        if number in self.failures:
            raise self.failures[number]
        return {"y": inputs["x"] * 10}

    @property
    def markers(self) -> list[list[float]]:
        """The first element of every row, batch by batch: which requests were sent together."""
        return [[float(row) for row in batch["x"].reshape(len(batch["x"]), -1)[:, 0]] for batch in self.batches]


def x(marker: float, rows: int = 1, width: int = 2, dtype=np.float32) -> np.ndarray:
    return np.full((rows, width), marker, dtype=dtype)


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


@pytest.fixture
async def make_batcher(node):
    made: list[Batcher] = []

    def make(**config) -> Batcher:
        batcher = Batcher("digits", BatchConfig(**config), node)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        await batcher.close()


async def hold(batcher: Batcher, node: FakeNode) -> asyncio.Task:
    """Occupy the batcher's only in-flight slot with a request whose send waits on the gate."""
    node.gate.clear()
    blocker = asyncio.create_task(batcher.submit({"x": x(BLOCKER)}))
    await asyncio.wait_for(node.called.wait(), PATIENCE_S)
    return blocker


async def enqueue(batcher: Batcher, *requests: dict) -> list[asyncio.Task]:
    """Submit requests as separate callers and return once every one sits in the queue."""
    before = len(batcher.queue)
    tasks = [asyncio.create_task(batcher.submit(**r)) for r in requests]
    await asyncio.sleep(0)
    assert len(batcher.queue) == before + len(requests)
    return tasks


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def release(node: FakeNode, blocker: asyncio.Task, tasks: list[asyncio.Task]) -> list:
    node.gate.set()
    await asyncio.wait_for(blocker, PATIENCE_S)
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), PATIENCE_S)


async def test_a_batch_is_sent_as_soon_as_it_reaches_max_batch_size(make_batcher, node):
    batcher = make_batcher(max_batch_size=4, max_queue_delay_us=FOREVER_US)
    results = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit({"x": x(i)}) for i in range(4))), PATIENCE_S)
    assert node.markers == [[0, 1, 2, 3]]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], x(i) * 10)


async def test_requests_beyond_max_batch_size_go_in_the_next_batch(make_batcher, node):
    batcher = make_batcher(max_batch_size=4)
    blocker = await hold(batcher, node)
    tasks = await enqueue(batcher, *({"inputs": {"x": x(i)}} for i in range(6)))
    await release(node, blocker, tasks)
    assert node.markers == [[BLOCKER], [0, 1, 2, 3], [4, 5]]


async def test_a_request_too_big_for_the_open_batch_waits_while_smaller_ones_fill_it(make_batcher, node):
    batcher = make_batcher(max_batch_size=4)
    blocker = await hold(batcher, node)
    tasks = await enqueue(batcher, {"inputs": {"x": x(3, rows=3)}}, {"inputs": {"x": x(2, rows=2)}},
                          {"inputs": {"x": x(1, rows=1)}})
    results = await release(node, blocker, tasks)
    assert node.markers == [[BLOCKER], [3, 3, 3, 1], [2, 2]]
    assert [r["y"].shape for r in results] == [(3, 2), (2, 2), (1, 2)]


async def test_a_partial_batch_is_sent_once_the_oldest_request_has_waited_max_queue_delay(make_batcher, node):
    batcher = make_batcher(max_batch_size=64, max_queue_delay_us=50_000)
    start = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(batcher.submit({"x": x(i)}) for i in range(3))), PATIENCE_S)
    assert time.monotonic() - start >= 0.045
    assert node.markers == [[0, 1, 2]]


@pytest.mark.parametrize(("preferred", "count"), [((3,), 3), ((2, 4), 4)], ids=["one-size", "two-sizes"])
async def test_a_preferred_batch_size_is_sent_without_waiting_for_the_delay(make_batcher, node, preferred, count):
    batcher = make_batcher(max_batch_size=64, max_queue_delay_us=FOREVER_US, preferred_batch_sizes=preferred)
    await asyncio.wait_for(asyncio.gather(*(batcher.submit({"x": x(i)}) for i in range(count))), PATIENCE_S)
    assert all(len(batch) in preferred for batch in node.markers)
    assert sorted(m for batch in node.markers for m in batch) == list(range(count))


async def test_the_largest_preferred_size_goes_at_once_and_the_rest_waits_out_the_delay(make_batcher, node):
    """Triton: a batch of the largest preferred size that can be formed is sent, even when the
    queue holds more rows than it but no other preferred size."""
    batcher = make_batcher(max_batch_size=64, max_queue_delay_us=300_000, preferred_batch_sizes=(4, 8))
    start = time.monotonic()
    tasks = [asyncio.create_task(batcher.submit({"x": x(i)})) for i in range(7)]
    await asyncio.wait_for(until(lambda: node.batches), PATIENCE_S)
    assert time.monotonic() - start < 0.2 and node.markers == [[0, 1, 2, 3]]
    await asyncio.wait_for(asyncio.gather(*tasks), PATIENCE_S)
    assert time.monotonic() - start >= 0.29 and node.markers == [[0, 1, 2, 3], [4, 5, 6]]


def queued(*sizes: int, enqueued: float = 0.0) -> list[Pending]:
    """1-row-wide requests of `sizes` rows (marker = position), queued at `enqueued`."""
    return [Pending({"x": x(i, rows=n)}, n, signature({"x": x(i, rows=n)}), enqueued=enqueued)
            for i, n in enumerate(sizes)]


@pytest.mark.parametrize(
    ("sizes", "preferred", "max_batch_size", "ready", "batch"),
    [((1,) * 7, (4, 8), 64, True, [0, 1, 2, 3]),
     ((1,) * 9, (4, 8), 64, True, list(range(8))),
     ((1,) * 3, (4, 8), 64, False, None),
     ((3, 1, 3), (4, 8), 64, True, [0, 1]),
     ((3, 3), (4, 8), 64, False, None),
     ((3, 3), (4,), 64, True, [0, 1]),
     ((1, 1, 3), (4,), 64, True, [0, 1, 2]),
     ((3, 2, 1, 2), (5,), 64, True, [0, 1]),
     ((2, 4, 3), (5,), 64, True, [0, 2]),
     ((6,), (4,), 64, True, [0]),
     ((1, 1, 1), (8,), 3, True, [0, 1, 2])],
    ids=["largest-formable", "largest-of-two", "below-the-smallest", "skips-what-does-not-fit",
         "a-larger-size-still-reachable", "every-size-passed-full-batch", "fill-falls-short-full-batch",
         "first-request-that-fits", "request-after-a-skip", "head-larger-than-every-size",
         "sizes-over-max-batch-size-ignored"],
)
def test_a_batch_is_formed_at_the_largest_preferred_size_its_requests_make_exactly(
        sizes, preferred, max_batch_size, ready, batch):
    config = BatchConfig(max_batch_size=max_batch_size, max_queue_delay_us=FOREVER_US,
                         preferred_batch_sizes=preferred)
    queue = queued(*sizes)
    assert batch_ready(queue, config, now=0.001) is ready
    if ready:
        formed, _ = form_batch(queue, config, now=0.001)
        assert [queue.index(p) for p in formed] == batch


def test_once_the_delay_has_passed_the_full_batch_goes_not_the_preferred_size():
    config = BatchConfig(max_batch_size=64, max_queue_delay_us=1000, preferred_batch_sizes=(4,))
    queue = queued(1, 1, 1, 1, 1)
    assert [queue.index(p) for p in form_batch(queue, config, now=0.0005)[0]] == [0, 1, 2, 3]
    assert [queue.index(p) for p in form_batch(queue, config, now=0.002)[0]] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("preferred", "max_batch_size", "expected"),
    [((4, 16, 8), 64, (16, 8, 4)), ((8, 4, 8, 4), 64, (8, 4)), ((2, 8, 16), 8, (8, 2)), ((), 64, ())],
    ids=["largest-first", "each-once", "over-max-batch-size-left-out", "none"],
)
def test_batch_rules_hold_the_preferred_sizes_up_to_max_batch_size_largest_first_each_once(
        preferred, max_batch_size, expected):
    config = BatchConfig(max_batch_size=max_batch_size, preferred_batch_sizes=preferred)
    assert BatchRules.of(config) == BatchRules(config, expected)


def test_candidates_are_the_most_urgent_requests_signature_mates_in_serving_order():
    queue = queued(1, 2, 3, 4)
    for p, level in zip(queue, (3, 2, 1, 3)):
        p.priority = level
    other = Pending({"x": x(9, width=3)}, 5, signature({"x": x(9, width=3)}), priority=1, enqueued=-1.0)  # later
    formed = candidates([queue[0], other, *queue[1:]])
    assert [queue.index(p) for p in formed.same] == [2, 1, 0, 3]
    assert (formed.rows, formed.oldest) == (10, -1.0)


def test_a_wake_up_forms_the_preferred_batch_once_and_takes_that_batch():
    queue = queued(1, 1, 1, 1)
    rules = BatchRules.of(BatchConfig(max_batch_size=64, max_queue_delay_us=FOREVER_US, preferred_batch_sizes=(4, 8)))
    formed = candidates(queue)
    assert is_ready(formed, rules, now=0.001)
    preferred = formed.preferred
    assert [queue.index(p) for p in preferred] == [0, 1, 2, 3]
    assert preferred_batch(formed, rules) is preferred
    assert take(queue, rules, 0.001, formed) == (preferred, [])


def test_a_wake_up_forms_the_candidates_again_of_what_is_left_once_requests_have_gone():
    queue = queued(1, 1, 1, 1, 1)
    rules = BatchRules.of(BatchConfig(max_batch_size=64, max_queue_delay_us=FOREVER_US, preferred_batch_sizes=(4, 8)))
    formed = candidates(queue)
    assert is_ready(formed, rules, now=0.001) and [queue.index(p) for p in formed.preferred] == [0, 1, 2, 3]
    queue[0].deadline = 0.0005
    batch, expired = take(queue, rules, 0.001, formed)
    assert ([queue.index(p) for p in batch], expired) == ([1, 2, 3, 4], [queue[0]])


async def test_the_lowest_priority_level_is_served_first_and_the_default_level_last(make_batcher, node):
    batcher = make_batcher(max_batch_size=2)
    blocker = await hold(batcher, node)
    levels = [DEFAULT_PRIORITY_LEVEL, 5, 1, 5, DEFAULT_PRIORITY_LEVEL]
    tasks = await enqueue(batcher, *({"inputs": {"x": x(i)}, "priority": p} for i, p in enumerate(levels)))
    await release(node, blocker, tasks)
    assert node.markers == [[BLOCKER], [2, 1], [3, 0], [4]]


async def test_a_request_already_past_its_deadline_fails_and_is_never_sent(make_batcher, node):
    batcher = make_batcher()
    with pytest.raises(DeadlineExceeded, match="model 'digits'"):
        await asyncio.wait_for(batcher.submit({"x": x(1)}, deadline=time.monotonic() - 1), PATIENCE_S)
    await asyncio.wait_for(batcher.submit({"x": x(2)}), PATIENCE_S)
    assert node.markers == [[2]]


async def test_a_deadline_passing_while_the_node_is_busy_fails_that_request_alone(make_batcher, node):
    batcher = make_batcher()
    blocker = await hold(batcher, node)
    short, long = await enqueue(batcher, {"inputs": {"x": x(1)}, "deadline": time.monotonic() + 0.02},
                                {"inputs": {"x": x(2)}})
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(short, PATIENCE_S)
    await release(node, blocker, [long])
    assert node.markers == [[BLOCKER], [2]]


async def test_a_deadline_passing_during_the_queue_delay_fails_the_request_at_its_deadline(make_batcher, node):
    batcher = make_batcher(max_queue_delay_us=FOREVER_US)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(batcher.submit({"x": x(1)}, deadline=time.monotonic() + 0.02), PATIENCE_S)
    await asyncio.wait_for(until(lambda: not batcher.queue), PATIENCE_S)
    assert node.batches == []


def dropped(reason: str, model: str = "digits") -> float:
    """cnei_batch_dropped_total of `model` for `reason` so far."""
    return REGISTRY.get_sample_value("cnei_batch_dropped_total", {"model": model, "reason": reason}) or 0.0


async def expire_in_the_queue(count: int) -> list:
    """`count` requests, one after another, each queued behind a long queue delay with a timeout
    of 20.1-20.9 ms (uvloop's timers count whole milliseconds): what each caller got."""
    batcher = Batcher("digits", BatchConfig(max_queue_delay_us=FOREVER_US), FakeNode())
    results = []
    try:
        for i in range(count):
            deadline = time.monotonic() + 0.0201 + 0.0001 * (i % 9)
            results += await asyncio.wait_for(asyncio.gather(batcher.submit({"x": x(i)}, deadline=deadline),
                                                             return_exceptions=True), PATIENCE_S)
        return results
    finally:
        await batcher.close()


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_requests_whose_timeout_ends_in_the_queue_are_counted_as_dropped_for_their_deadline_on_either_loop(new_loop):
    before = dropped("deadline"), dropped("cancelled")
    with asyncio.Runner(loop_factory=new_loop) as runner:
        results = runner.run(expire_in_the_queue(30))
    assert all(isinstance(r, DeadlineExceeded) for r in results)
    assert (dropped("deadline") - before[0], dropped("cancelled") - before[1]) == (30, 0)


async def test_a_full_queue_refuses_with_resource_exhausted(make_batcher, node):
    batcher = make_batcher(max_queue_size=2)
    blocker = await hold(batcher, node)
    tasks = await enqueue(batcher, {"inputs": {"x": x(1)}}, {"inputs": {"x": x(2)}})
    with pytest.raises(ResourceExhausted,
                       match=r"queue of model 'digits' is full \(2 requests\) at the default priority$"):
        await batcher.submit({"x": x(3)})
    await release(node, blocker, tasks)
    assert node.markers == [[BLOCKER], [1, 2]]


async def test_each_priority_level_has_its_own_queue_bound_so_queued_work_never_refuses_a_more_urgent_request(
        make_batcher, node):
    batcher = make_batcher(max_queue_size=2)
    blocker = await hold(batcher, node)
    low = await enqueue(batcher, *({"inputs": {"x": x(i)}, "priority": 5} for i in (1, 2)))
    with pytest.raises(ResourceExhausted, match=r"is full \(2 requests\) at priority 5$"):
        await batcher.submit({"x": x(3)}, priority=5)
    urgent = await enqueue(batcher, *({"inputs": {"x": x(i)}, "priority": 1} for i in (4, 5)))
    with pytest.raises(ResourceExhausted, match=r"is full \(2 requests\) at priority 1$"):
        await batcher.submit({"x": x(6)}, priority=1)
    await release(node, blocker, low + urgent)
    assert node.markers == [[BLOCKER], [4, 5, 1, 2]]


async def test_requests_of_different_shapes_or_datatypes_are_never_batched_together(make_batcher, node):
    batcher = make_batcher(max_batch_size=64)
    blocker = await hold(batcher, node)
    inputs = [x(1), x(2, width=3), x(3, dtype=np.float64), x(4, rows=2), x(5, width=3)]
    tasks = await enqueue(batcher, *({"inputs": {"x": a}} for a in inputs))
    results = await release(node, blocker, tasks)
    assert node.markers == [[BLOCKER], [1, 4, 4], [2, 5], [3]]
    for a, result in zip(inputs, results):
        assert result["y"].dtype == a.dtype
        np.testing.assert_array_equal(result["y"], a * 10)


async def test_a_cancelled_caller_is_taken_out_and_its_inputs_are_never_sent(make_batcher, node):
    batcher = make_batcher()
    blocker = await hold(batcher, node)
    gone, kept = await enqueue(batcher, {"inputs": {"x": x(1)}}, {"inputs": {"x": x(2)}})
    gone.cancel()
    results = await release(node, blocker, [gone, kept])
    assert isinstance(results[0], asyncio.CancelledError)
    np.testing.assert_array_equal(results[1]["y"], x(2) * 10)
    assert node.markers == [[BLOCKER], [2]]


async def test_a_failing_send_fails_every_caller_of_that_batch_and_no_other(make_batcher, node):
    batcher = make_batcher(max_batch_size=2)
    blocker = await hold(batcher, node)
    tasks = await enqueue(batcher, *({"inputs": {"x": x(i)}} for i in range(3)))
    node.failures[1] = Unavailable("node edge-1 is down")
    first, second, third = await release(node, blocker, tasks)
    assert node.markers == [[BLOCKER], [0, 1], [2]]
    assert first is second is node.failures[1]
    np.testing.assert_array_equal(third["y"], x(2) * 10)


async def test_the_batch_is_sent_with_the_latest_deadline_of_its_requests(make_batcher, node):
    batcher = make_batcher()
    blocker = await hold(batcher, node)
    soon, later = time.monotonic() + 30, time.monotonic() + 60
    tasks = await enqueue(batcher, {"inputs": {"x": x(1)}, "deadline": soon},
                          {"inputs": {"x": x(2)}, "deadline": later})
    await release(node, blocker, tasks)
    assert node.deadlines[1] == later


async def test_drain_and_close_serves_every_queued_request_before_stopping(make_batcher, node):
    batcher = make_batcher(max_batch_size=2, max_queue_delay_us=20_000)
    blocker = await hold(batcher, node)
    tasks = await enqueue(batcher, *({"inputs": {"x": x(i)}} for i in range(5)))
    closing = asyncio.create_task(batcher.drain_and_close(timeout_s=PATIENCE_S))
    results = await release(node, blocker, tasks)
    await asyncio.wait_for(closing, PATIENCE_S)
    assert [float(r["y"][0, 0]) for r in results] == [0, 10, 20, 30, 40]
    assert batcher._task.done()


@pytest.mark.parametrize(
    ("sizes", "expected_rows"),
    [([1, 3, 2], [[0], [1, 2, 3], [4, 5]]), ([2, 0, 4], [[0, 1], [], [2, 3, 4, 5]]), ([6], [[0, 1, 2, 3, 4, 5]])],
    ids=["three-callers", "an-empty-request", "one-caller"],
)
def test_split_gives_each_caller_its_own_rows_of_every_output(sizes, expected_rows):
    outputs = {"probabilities": np.arange(12, dtype=np.float32).reshape(6, 2), "label": np.arange(6)}
    parts = split(outputs, sizes)
    assert len(parts) == len(sizes)
    for part, rows in zip(parts, expected_rows):
        assert set(part) == {"probabilities", "label"}
        np.testing.assert_array_equal(part["label"], np.array(rows, dtype=int))
        np.testing.assert_array_equal(part["probabilities"], outputs["probabilities"][rows])


def test_form_batch_takes_out_expired_and_cancelled_requests_without_comparing_their_arrays():
    loop = asyncio.new_event_loop()
    try:
        def pending(marker: float, deadline: float = float("inf"), cancelled: bool = False) -> Pending:
            inputs = {"x": x(marker, rows=2)}
            future = loop.create_future()
            if cancelled:
                future.cancel()
            return Pending(inputs, 2, signature(inputs), deadline=deadline, future=future)

        late, gone, live = pending(1, deadline=5.0), pending(2, cancelled=True), pending(3)
        batch, expired = form_batch([late, gone, live], BatchConfig(max_batch_size=8), now=10.0)
    finally:
        loop.close()
    assert batch == [live]
    assert expired == [late, gone]


async def test_an_idle_batcher_sends_a_lone_request_from_the_callers_task_without_queueing(make_batcher, node):
    batcher = make_batcher(max_batch_size=8)
    node.gate.clear()
    first = asyncio.create_task(batcher.submit({"x": x(1)}))
    await asyncio.wait_for(node.called.wait(), PATIENCE_S)
    assert batcher.queue == [] and node.markers == [[1]]  # sent, never queued
    later = await enqueue(batcher, *({"inputs": {"x": x(i)}} for i in (2, 3, 4)))  # slot busy: they queue
    results = await release(node, first, later)
    assert node.markers == [[1], [2, 3, 4]]
    np.testing.assert_array_equal(results[2]["y"], x(4) * 10)


async def test_with_a_queue_delay_even_an_idle_batcher_waits_to_batch(make_batcher, node):
    batcher = make_batcher(max_batch_size=8, max_queue_delay_us=50_000)
    results = await asyncio.wait_for(asyncio.gather(
        batcher.submit({"x": x(1)}), batcher.submit({"x": x(2)})), PATIENCE_S)
    assert node.markers == [[1, 2]]
    np.testing.assert_array_equal(results[1]["y"], x(2) * 10)


async def test_each_caller_hears_how_long_its_request_waited_in_the_queue(make_batcher, node):
    batcher = make_batcher(max_batch_size=8)
    alone: list[int] = []
    await asyncio.wait_for(batcher.submit({"x": x(1)}, waited=alone), PATIENCE_S)  # idle: sent at once
    blocker = await hold(batcher, node)
    waits: list[list[int]] = [[], []]
    tasks = await enqueue(batcher, *({"inputs": {"x": x(i)}, "waited": waits[i]} for i in range(2)))
    await asyncio.sleep(0.03)  # the node is busy for 30 ms: both wait
    await release(node, blocker, tasks)
    assert len(alone) == 1 and alone[0] < 0.02e9
    assert [len(w) for w in waits] == [1, 1]
    assert all(0.03e9 <= w[0] < 10e9 for w in waits), waits


# --- a second batch in flight (max_inflight_batches > 1) ---------------------------------------

async def hold_rows(batcher: Batcher, node: FakeNode, rows: int) -> asyncio.Task:
    """A first batch of `rows` rows, in flight until the gate opens."""
    node.gate.clear()
    blocker = asyncio.create_task(batcher.submit({"x": x(BLOCKER, rows=rows)}))
    await asyncio.wait_for(node.called.wait(), PATIENCE_S)
    return blocker


async def test_a_second_batch_overlaps_the_one_in_flight_only_once_it_is_as_big(make_batcher, node):
    batcher = make_batcher(max_batch_size=8, max_inflight_batches=2)
    blocker = await hold_rows(batcher, node, rows=3)
    first = await enqueue(batcher, {"inputs": {"x": x(1)}})
    await asyncio.sleep(0.05)
    assert len(node.batches) == 1, "one row must not go next to a batch of three"
    second = await enqueue(batcher, {"inputs": {"x": x(2)}}, {"inputs": {"x": x(3)}})
    await asyncio.wait_for(until(lambda: len(node.batches) == 2), PATIENCE_S)
    assert node.markers[1] == [1, 2, 3]  # three rows: sent while the first batch still runs
    results = await release(node, blocker, first + second)
    assert [float(r["y"][0, 0]) for r in results] == [10, 20, 30]


async def test_rows_held_back_from_overlapping_go_as_soon_as_the_batch_in_flight_is_answered(make_batcher, node):
    batcher = make_batcher(max_batch_size=8, max_inflight_batches=2)
    blocker = await hold_rows(batcher, node, rows=4)
    tasks = await enqueue(batcher, {"inputs": {"x": x(1)}})
    await asyncio.sleep(0.05)
    assert len(node.batches) == 1
    results = await release(node, blocker, tasks)
    assert node.markers[1:] == [[1]]
    np.testing.assert_array_equal(results[0]["y"], x(1) * 10)


@pytest.mark.parametrize(
    ("queued_rows", "last_rows", "max_batch_size", "expected"),
    [(3, 3, 8, True), (2, 3, 8, False), (4, 16, 4, True), (1, 1, 8, True), (5, 3, 8, True)],
    ids=["as-big", "smaller", "full-batch", "single-rows", "bigger"],
)
def test_may_overlap_compares_the_head_rows_with_the_last_batch(queued_rows, last_rows, max_batch_size, expected):
    queue = [Pending({"x": x(i)}, 1, signature({"x": x(i)})) for i in range(queued_rows)]
    queue.append(Pending({"x": x(9, width=3)}, 5, signature({"x": x(9, width=3)})))  # another shape: not counted
    queue.sort(key=lambda p: p.size)  # the 1-row requests come first: the head is one of them
    assert may_overlap(queue, last_rows, max_batch_size) is expected


async def test_what_send_says_about_the_batch_reaches_every_caller_with_its_own_rows():
    async def send(inputs, size, deadline):
        return BatchOutputs({"y": inputs["x"] * 10}, info=("batch of", size))

    batcher = Batcher("digits", BatchConfig(max_batch_size=3, max_queue_delay_us=FOREVER_US), send,
                      component="runtime")
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit({"x": x(m, rows)}) for m, rows in ((1, 1), (2, 2)))), PATIENCE_S)
    finally:
        await batcher.close()
    assert [r.info for r in results] == [("batch of", 3)] * 2
    assert [r["y"][:, 0].tolist() for r in results] == [[10.0], [20.0, 20.0]]


@pytest.mark.parametrize("retry_alone", [True, False])
async def test_a_failed_batch_is_sent_again_one_by_one_only_where_asked(node, retry_alone):
    class Bad(Exception):
        pass

    async def send(inputs, size, deadline):
        await node(inputs, size, deadline)
        if (inputs["x"] == 13).any():
            raise Bad("row 13 cannot be computed")
        return {"y": inputs["x"] * 10}

    batcher = Batcher("digits", BatchConfig(max_batch_size=3, max_queue_delay_us=FOREVER_US), send,
                      retry_alone=retry_alone)
    try:
        results = await asyncio.wait_for(asyncio.gather(
            *(batcher.submit({"x": x(m)}) for m in (1, 13, 2)), return_exceptions=True), PATIENCE_S)
    finally:
        await batcher.close()
    if retry_alone:
        assert node.markers == [[1, 13, 2], [1], [13], [2]]
        assert [r["y"][0, 0] for r in (results[0], results[2])] == [10, 20] and isinstance(results[1], Bad)
    else:
        assert node.markers == [[1, 13, 2]] and all(isinstance(r, Bad) for r in results)


# --- answers that cannot be split, and queue slots of requests no one waits for ----------------

@pytest.mark.parametrize(
    ("answer", "shape"),
    [(lambda x_: np.asarray(x_.sum(), np.float32), r"\[\]"), (lambda x_: x_[:1] * 10, r"\[1, 2\]"),
     (lambda x_: np.concatenate([x_, x_]), r"\[4, 2\]")],
    ids=["no-batch-dimension", "too-few-rows", "too-many-rows"],
)
async def test_an_answer_that_cannot_be_split_fails_every_caller_at_once_naming_the_output(answer, shape):
    async def send(inputs, size, deadline):
        return {"y": answer(inputs["x"])}

    batcher = Batcher("digits", BatchConfig(max_batch_size=2, max_queue_delay_us=FOREVER_US), send)
    try:
        results = await asyncio.wait_for(asyncio.gather(
            batcher.submit({"x": x(1)}), batcher.submit({"x": x(2)}), return_exceptions=True), PATIENCE_S)
    finally:
        await batcher.close()
    for result in results:
        assert isinstance(result, UnsplittableBatch)
        assert result.code is ErrorCode.INTERNAL
        assert re.search(rf"model 'digits' answered a batch of 2 rows \(2 requests\) with output 'y' of shape "
                         rf"{shape}: it needs 2 rows", result.message), result.message


def test_split_refuses_an_output_whose_rows_are_not_the_batchs():
    with pytest.raises(UnsplittableBatch, match=r"output 'label' of shape \[5\]: it needs 6 rows"):
        split({"probabilities": np.zeros((6, 2)), "label": np.arange(5)}, [3, 3])


async def test_a_caller_that_gives_up_frees_its_queue_slot_while_a_batch_is_in_flight(make_batcher, node):
    batcher = make_batcher(max_queue_size=2)
    blocker = await hold(batcher, node)
    gone, expiring = await enqueue(batcher, {"inputs": {"x": x(1)}},
                                   {"inputs": {"x": x(2)}, "deadline": time.monotonic() + 0.02})
    gone.cancel()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(expiring, PATIENCE_S)
    await asyncio.sleep(0)
    assert batcher.queue == []
    newcomers = await enqueue(batcher, {"inputs": {"x": x(3)}}, {"inputs": {"x": x(4)}})
    results = await release(node, blocker, newcomers)
    assert node.markers == [[BLOCKER], [3, 4]]
    np.testing.assert_array_equal(results[1]["y"], x(4) * 10)


async def test_a_full_queue_counts_only_requests_someone_still_waits_for(make_batcher, node):
    batcher = make_batcher(max_queue_size=1)
    blocker = await hold(batcher, node)
    loop = asyncio.get_running_loop()
    ghost = Pending({"x": x(1)}, 1, signature({"x": x(1)}), future=loop.create_future())
    ghost.future.cancel()  # its caller gone, the entry not yet taken out
    batcher.queue.append(ghost)
    kept = asyncio.create_task(batcher.submit({"x": x(2)}))
    results = await release(node, blocker, [kept])
    assert node.markers == [[BLOCKER], [2]]
    np.testing.assert_array_equal(results[0]["y"], x(2) * 10)


async def test_closing_with_an_error_fails_the_queued_requests_with_it_at_once_and_later_ones_too(make_batcher, node):
    batcher = make_batcher()
    blocker = await hold(batcher, node)
    queued = await enqueue(batcher, {"inputs": {"x": x(1)}}, {"inputs": {"x": x(2)}})
    gone = Unavailable("node edge-1 left the mesh")
    closing = asyncio.create_task(batcher.close(gone))
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), PATIENCE_S)
    assert results == [gone, gone]  # while the batch in flight still waits for the node
    with pytest.raises(Unavailable, match="left the mesh"):
        await batcher.submit({"x": x(3)})
    node.gate.set()
    await asyncio.wait_for(closing, PATIENCE_S)
    np.testing.assert_array_equal((await blocker)["y"], x(BLOCKER) * 10)
    assert node.markers == [[BLOCKER]]
