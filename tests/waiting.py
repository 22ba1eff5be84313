"""Waiting in async tests for something another task or process brings about."""
from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate` every 0.1 s, letting the event loop run, until it is truthy; an
    AssertionError naming `what` after `timeout` seconds."""
    for _ in range(int(timeout / 0.1)):
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
