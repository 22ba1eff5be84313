"""Heartbeats over a slow link to Redis (an edge site far from the cloud): a runtime whose every
Redis round trip takes longer than a second still keeps its node record, and heartbeat settings
that could never keep one alive are refused at start."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from redis import Redis

from services.cli import infra
from services.common.nodes import NODE_KEY
from services.edge_runtime.heartbeat import check_settings
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
           "CNEI_RUNTIME_HEARTBEAT_INTERVAL_S": "0.5", "CNEI_RUNTIME_HEARTBEAT_TTL_S": "6",
           "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    with (tmp_path / "runtime.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.edge_runtime"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        infra.wait_for_port("127.0.0.1", port, proc=proc, timeout=30)
        key = NODE_KEY.format("far-edge")
        infra.wait_until(lambda: redis.exists(key), 20, "the far runtime's node record")
        # and it stays: each beat renews it before it expires, however long the round trip
        until = time.monotonic() + 5
        while time.monotonic() < until:
            assert redis.exists(key), "the node record expired between heartbeats"
            time.sleep(0.1)
    finally:
        infra.stop(proc)


@pytest.mark.parametrize("interval, ttl", [(0.5, 0.5), (1.0, 0.8), (0.0, 0.8), (-1.0, 2.0)])
def test_heartbeat_settings_that_cannot_keep_a_record_alive_are_refused(interval, ttl):
    settings = RuntimeSettings(heartbeat_interval_s=interval, heartbeat_ttl_s=ttl)
    with pytest.raises(SystemExit, match="CNEI_RUNTIME_HEARTBEAT_INTERVAL_S.*CNEI_RUNTIME_HEARTBEAT_TTL_S"):
        check_settings("CNEI_RUNTIME_", settings)


def test_the_default_heartbeat_settings_pass():
    check_settings("CNEI_RUNTIME_", RuntimeSettings())
