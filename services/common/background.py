"""Fire-and-forget work that is still kept, so it can be awaited at shutdown."""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine


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
