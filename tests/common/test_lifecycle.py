"""run_service: a service's process exits after its composition root returns, even when a
library leaves a task behind that ignores cancellation."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

from services.common import lifecycle


def test_a_task_that_ignores_cancellation_cannot_keep_the_service_alive(caplog):
    finished = []

    async def stubborn() -> None:  # like a reconnect loop that swallows CancelledError
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    async def polite() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            finished.append("polite")
            raise

    async def main() -> None:
        asyncio.ensure_future(stubborn())
        asyncio.ensure_future(polite())
        await asyncio.sleep(0)
        finished.append("main")

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="services.common.lifecycle"):
        lifecycle.run_service(main(), leftover_s=0.3)
    assert time.monotonic() - started < 3.0
    assert finished == ["main", "polite"]
    assert any("stubborn" in r.getMessage() and "still running" in r.getMessage() for r in caplog.records)


def test_the_composition_root_s_result_and_errors_are_not_swallowed():
    async def fails() -> None:
        raise RuntimeError("bad settings")

    with pytest.raises(RuntimeError, match="bad settings"):
        lifecycle.run_service(fails(), leftover_s=0.3)
