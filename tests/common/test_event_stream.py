"""The events stream (JetStream) as the services make it, against a NATS server of the test's own:
made with the configured limits (the oldest events dropped first), and never reverted by a
service that connects later: an operator's (or another service's) copies and limits stand, and
only subjects it lacks are added."""
from __future__ import annotations

import nats
import pytest
from nats.js.api import DiscardPolicy, StreamConfig

from services.cli import infra
from services.common import events
from services.common.bus import EventBus, StreamLimits


@pytest.fixture
def nats_url(tmp_path):
    port = infra.free_port()
    proc = infra.start_nats(port, tmp_path / "nats")
    yield f"nats://127.0.0.1:{port}"
    infra.stop(proc)


async def _config(url: str) -> StreamConfig:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(events.STREAM)).config
    finally:
        await nc.close()


async def _connect(url: str, limits: StreamLimits) -> None:
    bus = EventBus(url, "test", stream=limits)
    await bus.connect()
    await bus.close()


async def test_the_stream_is_made_with_its_limits_and_drops_the_oldest_first(nats_url):
    await _connect(nats_url, StreamLimits(max_age_s=3600.0, max_bytes=1 << 20))
    config = await _config(nats_url)
    assert (config.max_age, config.max_bytes, config.discard, config.num_replicas) == (
        3600.0, 1 << 20, DiscardPolicy.OLD, 1)
    assert sorted(config.subjects) == sorted(events.STREAM_SUBJECTS)


async def test_a_service_connecting_later_keeps_the_stream_as_it_is(nats_url):
    await _connect(nats_url, StreamLimits())
    nc = await nats.connect(nats_url)
    try:  # an operator gives it a day and 64 MB
        js = nc.jetstream()
        current = (await js.stream_info(events.STREAM)).config
        await js.update_stream(current.evolve(max_age=86400.0, max_bytes=64 << 20))
    finally:
        await nc.close()
    await _connect(nats_url, StreamLimits())  # a restarted service, with its defaults
    config = await _config(nats_url)
    assert (config.max_age, config.max_bytes) == (86400.0, 64 << 20)


async def test_subjects_a_stream_of_an_older_version_lacks_are_added_and_its_limits_kept(nats_url):
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=events.STREAM, subjects=events.STREAM_SUBJECTS[:1],
                                                     max_age=7200.0))
    finally:
        await nc.close()
    await _connect(nats_url, StreamLimits())
    config = await _config(nats_url)
    assert sorted(config.subjects) == sorted(events.STREAM_SUBJECTS) and config.max_age == 7200.0
