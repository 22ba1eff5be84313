"""Heartbeats over a slow link to Redis (an edge site far from the cloud): a runtime whose every
Redis round trip takes longer than a second still keeps its node record, and heartbeat settings
that could never keep one alive are refused at start."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from services.cli import infra
from services.common.bus import EventBus
from services.common.nodes import NODE_KEY, NodeDirectory
from services.edge_runtime.heartbeat import Heartbeat, check_settings, redis_client
from services.edge_runtime.settings import RuntimeSettings
from tests.netdelay import DelayProxy


@pytest.fixture
def far_redis(tmp_path):
    """A Redis of the test's own, and a link to it adding 0.7 s each way (1.4 s round trips)."""
    port = infra.free_port()
    proc = infra.start_redis(port, tmp_path / "redis")
    try:
        with DelayProxy("127.0.0.1", port, 0.7) as proxy:
            yield Redis(port=port), f"redis://127.0.0.1:{proxy.port}/0"
    finally:
        infra.stop(proc)


def test_a_runtime_behind_a_slow_link_keeps_its_node_record(far_redis, registry, nats_server, tmp_path):
    redis, far_url = far_redis
    port = infra.free_port()
    env = {**os.environ, "CNEI_RUNTIME_NODE_ID": "far-edge", "CNEI_RUNTIME_PORT": str(port),
           "CNEI_RUNTIME_METRICS_PORT": "0", "CNEI_RUNTIME_REGISTRY_TARGET": registry,
           "CNEI_RUNTIME_REDIS_URL": far_url, "CNEI_RUNTIME_NATS_URL": nats_server,
           "CNEI_RUNTIME_CACHE_DIR": str(tmp_path / "cache"), "CNEI_RUNTIME_PRELOAD": "",
           "CNEI_RUNTIME_HEARTBEAT_INTERVAL_S": "0.5", "CNEI_RUNTIME_HEARTBEAT_TTL_S": "3",
           "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    with (tmp_path / "runtime.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.edge_runtime"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        infra.wait_for_port("127.0.0.1", port, proc=proc, timeout=30)
        key = NODE_KEY.format("far-edge")
        infra.wait_until(lambda: redis.exists(key), 20, "the far runtime's node record")
        # and it stays: each beat renews it before it expires, however long the round trip (watched
        # for longer than the TTL: a record the first beat wrote and no other renewed would go)
        until = time.monotonic() + 4
        while time.monotonic() < until:
            assert redis.exists(key), "the node record expired between heartbeats"
            time.sleep(0.1)
    finally:
        infra.stop(proc, timeout=1)  # its shutdown over the slow link is not what is tested here


@pytest.mark.parametrize("interval, ttl", [(0.5, 0.5), (1.0, 0.8), (0.0, 0.8), (-1.0, 2.0)])
def test_heartbeat_settings_that_cannot_keep_a_record_alive_are_refused(interval, ttl):
    settings = RuntimeSettings(heartbeat_interval_s=interval, heartbeat_ttl_s=ttl)
    with pytest.raises(SystemExit, match="CNEI_RUNTIME_HEARTBEAT_INTERVAL_S.*CNEI_RUNTIME_HEARTBEAT_TTL_S"):
        check_settings("CNEI_RUNTIME_", settings)


def test_the_default_heartbeat_settings_pass():
    check_settings("CNEI_RUNTIME_", RuntimeSettings())


async def test_a_runtime_whose_redis_connection_goes_silent_is_back_within_about_one_record_life(
        tmp_path, nats_server):
    """A connection gone silent (no reset) is given up after one TTL and made anew, so a cloud
    node (0.2 s / 0.8 s) is out of the view for about a second, not for the ~10 s a beat may take
    over a slow link."""
    port = infra.free_port()
    proc = infra.start_redis(port, tmp_path / "redis")
    direct = AsyncRedis(port=port)
    try:
        with DelayProxy("127.0.0.1", port, 0.0) as proxy:
            settings = RuntimeSettings(node_id="c1", tier="cloud", redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                                       metrics_interval_s=0)
            client = redis_client(settings)
            bus = EventBus(nats_server, "runtime/c1")
            await bus.connect()
            runtime = SimpleNamespace(l1=SimpleNamespace(keys=lambda: [], bytes_used=0), inflight=0)
            beat = Heartbeat(settings, runtime, NodeDirectory(client), bus)
            beat.start()
            try:
                key = NODE_KEY.format("c1")
                await _until(lambda: direct.exists(key), 5)
                proxy.silence()
                missing, began = 0.0, time.monotonic()
                while time.monotonic() - began < 5:  # a connection kept (a beat of ~10 s) misses ~4 s of it
                    if not await direct.exists(key):
                        missing += 0.05
                    await asyncio.sleep(0.05)
                assert missing < 3, f"the node record was missing for {missing:.1f} s of 5 s"
                assert await direct.exists(key)
            finally:
                await beat.stop()
                await client.aclose()
                await bus.close()
    finally:
        await direct.aclose()
        infra.stop(proc)


async def _until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
