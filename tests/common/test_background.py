import asyncio

import pytest

from services.common.background import KeyedLocks


async def test_keyed_locks_serialise_one_key_and_forget_it_once_free():
    locks = KeyedLocks()
    order: list[str] = []

    async def work(key: str, name: str, hold: asyncio.Event | None = None):
        async with locks.hold(key):
            order.append(f"{name} in")
            if hold is not None:
                await hold.wait()
            order.append(f"{name} out")

    release = asyncio.Event()
    first = asyncio.create_task(work("a", "first", release))
    await asyncio.sleep(0)
    second = asyncio.create_task(work("a", "second"))
    other = asyncio.create_task(work("b", "other"))
    await asyncio.sleep(0.01)
    # the other key is not held up; the second holder of "a" waits for the first
    assert order == ["first in", "other in", "other out"]
    assert len(locks) == 1
    release.set()
    await asyncio.gather(first, second, other)
    assert order[3:] == ["first out", "second in", "second out"]
    assert len(locks) == 0


async def test_keyed_locks_forget_a_key_when_its_holder_fails_or_a_waiter_is_cancelled():
    locks = KeyedLocks()
    with pytest.raises(RuntimeError):
        async with locks.hold("a"):
            raise RuntimeError("boom")
    assert len(locks) == 0

    release = asyncio.Event()

    async def holder():
        async with locks.hold("a"):
            await release.wait()

    async def waiter():
        async with locks.hold("a"):
            pass

    held = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(locks) == 1
    release.set()
    await held
    assert len(locks) == 0
