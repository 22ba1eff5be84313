"""Registry reads kept past their lifetime (stale_reads, registry_outage) on their own: a read is
an async function that answers, fails as the registry client fails, or hangs."""
from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.errors import ErrorCode, InvalidArgument, Unavailable, error_for
from services.coordinator.registry_outage import Outage, RegistryUnreachable
from services.coordinator.stale_reads import StaleReads

TTL_S = 0.05
TIMEOUT_S = 0.2
TARGET = "127.0.0.1:50051"


class Registry:
    """Answers `value` for every key, fails with `failure`, or hangs while `hang` is set; counts reads."""

    def __init__(self):
        self.value = "v1"
        self.failure: Exception | None = None
        self.hang = False
        self.reads = 0

    async def read(self, key: str) -> str:
        self.reads += 1
        if self.hang:
            await asyncio.sleep(60)
        if self.failure is not None:
            raise self.failure
        return f"{key}:{self.value}"


def reads(registry: Registry) -> StaleReads[str]:
    return StaleReads(registry.read, TTL_S, TIMEOUT_S, Outage(TARGET), lambda key: f"model '{key}'")


def away(registry: Registry, how: str) -> None:
    if how == "hangs":
        registry.hang = True
    else:
        registry.failure = error_for(ErrorCode[how.upper()], f"registry {TARGET}: failed to connect")


OUTAGES = ["unavailable", "deadline_exceeded", "hangs"]


async def test_an_answer_past_its_lifetime_is_served_at_once_and_read_again_in_the_background():
    registry = Registry()
    cache = reads(registry)
    assert await cache.get("digits") == "digits:v1"
    registry.value = "v2"
    assert await cache.get("digits") == "digits:v1" and registry.reads == 1  # fresh
    await asyncio.sleep(TTL_S * 1.5)
    assert await cache.get("digits") == "digits:v1"  # past its lifetime: served, read again
    await asyncio.sleep(0.01)
    assert await cache.get("digits") == "digits:v2" and registry.reads == 2


async def test_requests_for_a_key_never_read_share_one_read():
    registry = Registry()
    cache = reads(registry)
    assert await asyncio.gather(*(cache.get("digits") for _ in range(10))) == ["digits:v1"] * 10
    assert registry.reads == 1


@pytest.mark.parametrize("how", OUTAGES)
async def test_a_registry_that_does_not_answer_leaves_the_last_answer_in_force_without_a_wait(how):
    registry = Registry()
    cache = reads(registry)
    await cache.get("digits")
    away(registry, how)
    await asyncio.sleep(TTL_S * 1.5)
    for _ in range(20):
        began = asyncio.get_running_loop().time()
        assert await cache.get("digits") == "digits:v1"
        assert asyncio.get_running_loop().time() - began < TIMEOUT_S / 4
        await asyncio.sleep(0)
    assert registry.reads == 2  # one read at a time, and none again before another lifetime passed
    await cache.close()


@pytest.mark.parametrize("how", OUTAGES)
async def test_a_key_never_read_fails_unavailable_naming_the_registry(how):
    registry = Registry()
    cache = reads(registry)
    away(registry, how)
    with pytest.raises(RegistryUnreachable) as refused:
        await cache.get("never-seen")
    assert refused.value.code == ErrorCode.UNAVAILABLE
    assert refused.value.message.startswith(f"registry {TARGET} unreachable and model 'never-seen' was never read")


async def test_an_answer_that_is_no_outage_reaches_the_caller():
    registry = Registry()
    registry.failure = InvalidArgument("model name '' is not valid")
    with pytest.raises(InvalidArgument):
        await reads(registry).get("")


async def test_a_change_announced_while_the_registry_is_away_applies_at_once():
    registry = Registry()
    cache = reads(registry)
    await cache.get("digits")
    away(registry, "unavailable")
    cache.change("digits", "digits:v1-without-v2")
    assert await cache.get("digits") == "digits:v1-without-v2"
    registry.failure = None
    cache.change("digits")  # known away: served as it was, and read again in the background
    assert await cache.get("digits") == "digits:v1-without-v2"
    await asyncio.sleep(0.01)
    assert await cache.get("digits") == "digits:v1"


async def test_a_read_begun_before_a_change_does_not_overwrite_it():
    registry = Registry()
    cache = reads(registry)
    await cache.get("digits")
    registry.value = "before-the-event"
    await asyncio.sleep(TTL_S * 1.5)
    await cache.get("digits")  # a read in the background, begun now
    cache.change("digits", "digits:as-the-event-says")
    registry.failure = Unavailable("registry away")
    await asyncio.sleep(0.01)
    assert await cache.get("digits") == "digits:as-the-event-says"


async def test_an_outage_is_logged_once_and_its_end_once(caplog):
    registry = Registry()
    outage = Outage(TARGET)
    cache = StaleReads(registry.read, TTL_S, TIMEOUT_S, outage, lambda key: key)
    await cache.get("digits")
    away(registry, "unavailable")
    with caplog.at_level(logging.INFO, logger="services.coordinator.registry_outage"):
        for _ in range(5):
            await asyncio.sleep(TTL_S * 1.5)
            await cache.get("digits")
            await asyncio.sleep(0.01)
        assert outage.down and outage.seconds() > 0 and not outage.summary()["reachable"]
        registry.failure = None
        await asyncio.sleep(TTL_S * 1.5)
        await cache.get("digits")
        await asyncio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "unreachable" in line] == [lines[0]] and len(lines) == 2, lines
    assert lines[1].startswith(f"registry {TARGET} reachable again") and not outage.down
