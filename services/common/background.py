"""Fire-and-forget work that is still kept, so it can be awaited at shutdown."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine


class Background:
    """Holds a reference to every task it starts until the task ends."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def wait(self) -> None:
        """Wait for what is running now (their errors are not re-raised)."""
        await asyncio.gather(*self.tasks, return_exceptions=True)


class KeyedLocks:
    """One asyncio lock per key, held only while someone holds or waits for it: single-flight
    work by key (a download per artifact, a load per variant) without a lock kept for every key
    ever seen."""

    def __init__(self) -> None:
        self._locks: dict[object, tuple[asyncio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: object) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]
