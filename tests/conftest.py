"""Shared fixtures: real NATS (JetStream) and Redis servers on free ports, one per test session."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from services.cli import infra
from services.common import events
from tests.recorded_spans import spans  # noqa: F401 - a fixture for every test

# A shell runs a command it starts in the background (`make test &`, a CI script's `cmd &`) with
# Ctrl-C ignored, which every process the tests start would inherit: the tests of what Ctrl-C does
# to `cnei` commands and services need it back as a terminal delivers it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


def _nats_taking_at_most(tmp_path: Path, port: int, max_payload: int) -> subprocess.Popen:
    """nats-server with JetStream whose messages are at most `max_payload` bytes."""
    conf, store = tmp_path / "nats.conf", tmp_path / "store"
    conf.write_text(f'listen: "127.0.0.1:{port}"\nmax_payload: {max_payload}\njetstream {{ store_dir: "{store}" }}\n')
    proc = subprocess.Popen([infra.find_binary("nats-server"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    infra.wait_for_port("127.0.0.1", port, proc=proc)
    return proc


@pytest.fixture
async def small_nats(tmp_path: Path):
    """A NATS taking messages of 4 KB at most, whose events stream an operator made for
    messages of 1,000 bytes at most."""
    port = infra.free_port()
    proc = _nats_taking_at_most(tmp_path, port, 4096)
    url = f"nats://127.0.0.1:{port}"
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(StreamConfig(name=events.STREAM, subjects=events.STREAM_SUBJECTS,
                                                 max_msg_size=1000))
    await nc.close()
    yield url
    infra.stop(proc)
