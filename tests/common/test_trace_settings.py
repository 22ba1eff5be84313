"""Triton's trace settings (OpenTelemetry mode): checks, model settings over global ones, the
1-in-N sampling and the count of traces left, in one process's memory and in real Redis shared
by several processes' views."""
from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from services.common.errors import InvalidArgument
from services.common.trace_settings import (MemoryTraceStore, RedisTraceStore, TraceConfig, TraceSettings,
                                            config_from, parse_update)


@pytest.mark.parametrize("changes, message", [
    ({"trace_rat": ["1"]}, "unknown trace setting 'trace_rat'"),
    ({"trace_rate": ["0"]}, "'trace_rate' must be an integer of at least 1, not '0'"),
    ({"trace_rate": ["ten"]}, "'trace_rate' must be an integer of at least 1, not 'ten'"),
    ({"trace_rate": ["1", "2"]}, "'trace_rate' takes one value"),
    ({"trace_count": ["-2"]}, "'trace_count' must be an integer of at least -1"),
    ({"trace_level": ["TENSORS"]}, "trace level TENSORS is not offered"),
    ({"trace_level": ["OFF", "TIMESTAMPS"]}, "OFF cannot be combined"),
    ({"trace_file": ["/tmp/t.json"]}, "belongs to Triton's file trace mode"),
    ({"log_frequency": ["10"]}, "belongs to Triton's file trace mode"),
    ({"trace_mode": ["triton"]}, "trace_mode is opentelemetry"),
])
def test_bad_settings_are_refused_with_what_is_wrong(changes, message):
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        parse_update(changes)


def test_updates_parse_to_fields_and_none_clears_a_models_own():
    assert parse_update({"trace_level": ["timestamps"], "trace_rate": ["10"], "trace_count": ["-1"]}) == \
        {"level": ("TIMESTAMPS",), "rate": 10, "count": -1}
    assert parse_update({"trace_rate": None, "trace_count": []}) == {"rate": None, "count": None}
    assert parse_update({"trace_mode": ["opentelemetry"]}) == {}
    with pytest.raises(ValueError, match="trace_rate"):
        config_from("TIMESTAMPS", 0, -1)


async def test_model_settings_override_the_global_ones_until_cleared():
    tracing = TraceSettings(MemoryTraceStore(TraceConfig(level=("OFF",), rate=1000, count=-1)))
    assert (await tracing.get())["trace_level"] == ["OFF"]
    updated = await tracing.update("digits", {"trace_level": ["TIMESTAMPS"], "trace_rate": ["2"]})
    assert updated == {"trace_level": ["TIMESTAMPS"], "trace_rate": ["2"], "trace_count": ["-1"],
                       "log_frequency": ["0"], "trace_file": [""], "trace_mode": ["opentelemetry"]}
    assert (await tracing.get())["trace_rate"] == ["1000"]  # the global ones are unchanged
    await tracing.update("", {"trace_rate": ["50"]})
    assert (await tracing.get("digits"))["trace_rate"] == ["2"]  # the model's own wins
    assert (await tracing.get("wide_mlp"))["trace_rate"] == ["50"]  # no own settings: the global
    await tracing.update("digits", {"trace_rate": None})
    assert (await tracing.get("digits"))["trace_rate"] == ["50"]  # cleared: follows the global again
    assert (await tracing.get("digits"))["trace_level"] == ["TIMESTAMPS"]


async def test_a_cleared_global_setting_is_the_configured_one_again():
    tracing = TraceSettings(MemoryTraceStore(), configured=TraceConfig(level=("OFF",), rate=1000, count=5))
    await tracing.update("", {"trace_level": ["TIMESTAMPS"], "trace_rate": ["2"], "trace_count": ["-1"]})
    cleared = await tracing.update("", {"trace_level": None, "trace_rate": [], "trace_count": None, "trace_file": None})
    assert (cleared["trace_level"], cleared["trace_rate"], cleared["trace_count"]) == (["OFF"], ["1000"], ["5"])


async def test_one_request_in_rate_is_traced_and_off_traces_none():
    tracing = TraceSettings(MemoryTraceStore(TraceConfig(rate=3)))
    picks = [await tracing.pick("digits") for _ in range(9)]
    assert picks == [False, False, True] * 3
    assert [await tracing.pick("other") for _ in range(3)] == [False, False, True]  # counted per model
    assert await tracing.pick("digits", picked=True)  # sampled by the door already: no second 1-in-3
    await tracing.update("digits", {"trace_level": ["OFF"]})
    assert not any([await tracing.pick("digits", picked=True) for _ in range(6)])


async def test_the_count_runs_down_and_a_models_own_count_is_its_own():
    tracing = TraceSettings(MemoryTraceStore(TraceConfig(rate=1, count=2)))
    assert [await tracing.pick("digits") for _ in range(4)] == [True, True, False, False]
    assert (await tracing.get())["trace_count"] == ["0"]
    assert not (await tracing.config()).on
    await tracing.update("wide_mlp", {"trace_count": ["1"]})
    assert [await tracing.pick("wide_mlp") for _ in range(2)] == [True, False]
    assert not await tracing.pick("digits")


async def test_redis_settings_are_shared_by_every_process_view_and_the_count_is_taken_once(own_redis):
    first = TraceSettings(RedisTraceStore(own_redis), ttl_s=0.0)
    second = TraceSettings(RedisTraceStore(own_redis), ttl_s=0.0)  # another coordinator worker
    await first.store.reset(TraceConfig(level=("TIMESTAMPS",), rate=1, count=5))
    await first.update("digits", {"trace_rate": ["4"], "trace_level": ["TIMESTAMPS"]})
    assert (await second.get("digits"))["trace_rate"] == ["4"]
    assert (await second.get())["trace_rate"] == ["1"]
    # ten processes pick at once: five traces are left, so exactly five start
    views = [TraceSettings(RedisTraceStore(own_redis), ttl_s=0.0) for _ in range(10)]
    picks = await asyncio.gather(*(v.pick("wide_mlp", picked=True) for v in views))
    assert sum(picks) == 5
    assert (await second.get("wide_mlp"))["trace_count"] == ["0"]
    await second.update("digits", {"trace_count": ["-1"]})  # the model's own: unlimited
    assert await first.pick("digits", picked=True)
    await first.update("digits", {"trace_count": None, "trace_rate": None})
    assert (await second.get("digits"))["trace_count"] == ["0"]
    await first.store.reset(TraceConfig(level=("OFF",)))  # a coordinator starting: its configuration
    assert (await second.get("digits"))["trace_level"] == ["OFF"]


async def test_concurrent_updates_of_one_scope_lose_none(own_redis):
    store = RedisTraceStore(own_redis)
    await store.reset(TraceConfig())
    views = [TraceSettings(RedisTraceStore(own_redis), ttl_s=0.0) for _ in range(2)]
    await asyncio.gather(views[0].update("digits", {"trace_rate": ["7"]}),
                         views[1].update("digits", {"trace_level": ["OFF"]}))
    assert await store.read() == {"": {"level": ["TIMESTAMPS"], "rate": 1, "count": -1},
                                  "digits": {"rate": 7, "level": ["OFF"]}}


async def test_with_redis_away_the_settings_read_last_keep_applying(own_redis):
    store = RedisTraceStore(own_redis)
    await store.reset(TraceConfig(rate=2))
    tracing = TraceSettings(store, ttl_s=0.0)
    assert (await tracing.config("digits")).rate == 2
    tracing.store = RedisTraceStore(Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5))  # nothing there
    assert [await tracing.pick("digits") for _ in range(4)] == [False, True, False, True]
    await tracing.store.redis.aclose()


async def test_settings_configured_while_redis_was_away_are_written_when_it_answers(own_redis):
    """A coordinator whose start could not reset the store (Redis down) writes its configured
    settings once Redis answers, so its trace_count is counted down there, by every process."""
    configured = TraceConfig(level=("TIMESTAMPS",), rate=1, count=2)
    first = TraceSettings(RedisTraceStore(own_redis), ttl_s=0.0, configured=configured)
    second = TraceSettings(RedisTraceStore(own_redis), ttl_s=0.0, configured=configured)
    assert await own_redis.exists(first.store.key) == 0  # nothing written: the start's reset failed
    picks = [await view.pick("digits", picked=True) for view in (first, second, first, second)]
    assert picks == [True, True, False, False]
    assert (await second.get())["trace_count"] == ["0"]


async def test_a_seed_fills_in_only_what_the_store_lacks(own_redis):
    store = RedisTraceStore(own_redis)
    await store.reset(TraceConfig(rate=5, count=3))
    await store.seed(TraceConfig(rate=1, count=-1))  # another process's configuration: not over it
    assert await store.read() == {"": {"level": ["TIMESTAMPS"], "rate": 5, "count": 3}}
    memory = MemoryTraceStore()
    await memory.seed(TraceConfig(rate=4))
    assert (await memory.read())[""]["rate"] == 4
