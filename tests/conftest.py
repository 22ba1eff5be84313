"""Shared fixtures: real NATS (JetStream) and Redis servers on free ports, one per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import infra


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory) -> str:
    port = infra.free_port()
    proc = infra.start_nats(port, tmp_path_factory.mktemp("nats"))
    yield f"nats://127.0.0.1:{port}"
    infra.stop(proc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> str:
    port = infra.free_port()
    proc = infra.start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    infra.stop(proc)


@pytest.fixture
async def own_redis(redis_server):
    """A client of a Redis database of the test's own (db 8, emptied before and after): what it
    writes is never seen by the mesh's services of later e2e tests, which use db 0."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_server.rsplit("/", 1)[0] + "/8")
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory) -> list:
    """The digits demo variants (FP32, FP16, INT8), built once per test session."""
    from services.models import digits

    return digits.build(Path(tmp_path_factory.mktemp("models")))
