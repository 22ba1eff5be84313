"""The event bus when NATS has no stream for the events: after a restart on a fresh store (a
container without its volume) or after the stream was deleted. The bus makes the stream again,
its outbox drains, JetStream holds each event once, and a live subscriber's handler gets each
once, though a try JetStream never acknowledged reached it before the retry. Real nats-server
processes on free ports."""
from __future__ import annotations

import asyncio
import collections

import nats
import pytest
from nats.js.api import DeliverPolicy

from services.cli import infra
from services.common import events
from services.common.bus import EventBus
from tests.waiting import until

SUBJECT = events.MODEL_PUBLISHED


@pytest.fixture
def nats_process(tmp_path):
    """A nats-server of the test's own, which `restart(store)` replaces with one on the same
    port over the store directory `store` (a fresh one: no stream)."""
    port = infra.free_port()
    running = [infra.start_nats(port, tmp_path / "store-1")]

    def restart(store: str) -> None:
        infra.stop(running[0])
        running[0] = infra.start_nats(port, tmp_path / store)

    yield f"nats://127.0.0.1:{port}", restart, lambda: infra.stop(running[0])
    infra.stop(running[0])


async def _stored(url: str) -> collections.Counter:
    """How many times the stream holds each event's payload name."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=5)
        sub = await js.subscribe(SUBJECT, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        total = (await js.stream_info(events.STREAM)).state.messages
        seen = collections.Counter()
        for _ in range(total):
            seen[events.decode((await sub.next_msg(timeout=5)).data).payload["name"]] += 1
        return seen
    finally:
        await nc.close()


async def test_an_outbox_drains_into_a_nats_that_came_back_without_the_stream(nats_process, tmp_path):
    url, restart, stop = nats_process
    bus = EventBus(url, "test", outbox=tmp_path / "outbox.jsonl", timeout=1.0)
    await bus.start()
    try:
        await bus.publish(SUBJECT, {"name": "before"})
        await asyncio.to_thread(stop)
        await until(lambda: not bus.connected, 10, "the bus to see NATS gone")
        for name in ("while-away-1", "while-away-2"):
            await bus.publish(SUBJECT, {"name": name})
        assert len(bus.outbox) == 2
        await asyncio.to_thread(restart, "store-2")  # a fresh store: no stream
        await until(lambda: bus.connected and not len(bus.outbox), 20, "the outbox to drain")
        await bus.publish(SUBJECT, {"name": "after"})
        assert await _stored(url) == {"while-away-1": 1, "while-away-2": 1, "after": 1}
    finally:
        await bus.close()


async def test_a_live_subscriber_gets_each_event_once_when_the_stream_was_missing(nats_process, tmp_path):
    url, _, _ = nats_process
    received: collections.Counter = collections.Counter()

    async def handler(envelope: events.Envelope) -> None:
        received[envelope.payload["name"]] += 1

    publisher = EventBus(url, "test", outbox=tmp_path / "outbox.jsonl", timeout=1.0)
    subscriber = EventBus(url, "listener", timeout=1.0)
    await publisher.start()
    await subscriber.start()
    try:
        await subscriber.subscribe(SUBJECT, handler)
        await subscriber.nc.flush(timeout=5)
        admin = await nats.connect(url, connect_timeout=5)
        await admin.jetstream(timeout=5).delete_stream(events.STREAM)
        await admin.close()
        # each first try reaches the subscriber, then times out unacknowledged: kept in the outbox
        for name in ("a", "b", "c"):
            await publisher.publish(SUBJECT, {"name": name})
        await until(lambda: not len(publisher.outbox), 20, "the outbox to drain")
        await until(lambda: set(received) == {"a", "b", "c"}, 5, "every event handled")
        await asyncio.sleep(1.0)  # any retry still under way arrives
        assert received == {"a": 1, "b": 1, "c": 1}
        assert await _stored(url) == {"a": 1, "b": 1, "c": 1}
    finally:
        await subscriber.close()
        await publisher.close()


def test_recent_ids_know_an_id_seen_among_the_last_ones_only():
    recent = events.RecentIds(size=2)
    assert [recent.first_time(i) for i in ("x", "y", "x")] == [True, True, False]
    assert recent.first_time("z")  # x was seen again last, so y is now the oldest and goes
    assert (recent.first_time("x"), recent.first_time("y")) == (False, True)
