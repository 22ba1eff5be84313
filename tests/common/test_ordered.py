"""map_in_order: concurrent work on a stream's items, results in item order, bounded, cancellable."""
from __future__ import annotations

import asyncio

import pytest

from services.common.ordered import map_in_order


async def stream(items, gap: float = 0.0):
    for item in items:
        if gap:
            await asyncio.sleep(gap)
        yield item


class Tracker:
    """Work that sleeps for the item's delay and records how many ran at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started: list = []
        self.cancelled: list = []

    async def work(self, item):
        delay, value = item
        self.started.append(value)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.cancelled.append(value)
            raise
        finally:
            self.running -= 1
        if isinstance(value, Exception):
            raise value
        return value


async def test_results_keep_item_order_when_later_items_finish_first():
    tracker = Tracker()
    items = [(0.05, "a"), (0.0, "b"), (0.02, "c"), (0.0, "d")]
    got = [r async for r in map_in_order(stream(items), tracker.work, window=8)]
    assert got == ["a", "b", "c", "d"]
    assert tracker.most == 4  # all four ran together, not one after another


async def test_items_run_concurrently_so_the_stream_takes_about_the_longest_item():
    tracker = Tracker()
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = [r async for r in map_in_order(stream([(0.1, i) for i in range(10)]), tracker.work, window=16)]
    assert got == list(range(10))
    assert loop.time() - start < 0.5  # serially it would take 1 s


async def test_at_most_window_items_run_and_the_rest_wait_to_be_read():
    tracker = Tracker()
    got = [r async for r in map_in_order(stream([(0.01, i) for i in range(20)]), tracker.work, window=3)]
    assert got == list(range(20))
    assert tracker.most == 3


async def test_a_failing_item_ends_the_stream_after_every_earlier_result():
    tracker = Tracker()
    boom = RuntimeError("item 2 failed")
    items = [(0.02, 0), (0.0, 1), (0.0, boom), (0.2, 3)]
    got = []
    with pytest.raises(RuntimeError, match="item 2 failed"):
        async for r in map_in_order(stream(items), tracker.work, window=8):
            got.append(r)
    assert got == [0, 1]
    assert tracker.cancelled == [3]  # the later item still running is cancelled, not leaked


async def test_an_error_reading_the_stream_comes_after_the_results_before_it():
    async def broken():
        yield (0.01, "a")
        yield (0.0, "b")
        raise ConnectionError("client went away")

    tracker = Tracker()
    got = []
    with pytest.raises(ConnectionError, match="client went away"):
        async for r in map_in_order(broken(), tracker.work, window=8):
            got.append(r)
    assert got == ["a", "b"]


async def test_a_consumer_that_stops_early_cancels_the_work_still_running():
    tracker = Tracker()
    results = map_in_order(stream([(0.0, "first")] + [(5.0, i) for i in range(4)]), tracker.work, window=8)
    assert await results.__anext__() == "first"
    await asyncio.sleep(0.01)  # the reader starts the slow ones
    await results.aclose()
    assert sorted(tracker.cancelled) == [0, 1, 2, 3]
    assert tracker.running == 0


async def test_a_window_below_one_is_refused():
    with pytest.raises(ValueError, match="window"):
        await map_in_order(stream([]), Tracker().work, window=0).__anext__()
