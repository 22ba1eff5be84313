"""The event bus against NATS servers of the test's own: a service that starts while NATS answers
but its JetStream does not (a cluster still electing its leader) subscribes once JetStream is
there, holding no connection meanwhile; an event NATS would never take (over its max_payload, or
refused by the stream) is refused or dropped, never left to hold up the outbox."""
from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from pathlib import Path

import nats
import pytest
from nats.js.api import DeliverPolicy
from prometheus_client import REGISTRY

from services.cli import infra
from services.common import bus as bus_module
from services.common import events
from services.common.bus import EventBus
from services.common.events import EventRefused, EventTooLarge
from services.common.outbox import Outbox
from tests.waiting import until

SUBJECT = events.MODEL_PUBLISHED


@pytest.fixture
def quick_retries(monkeypatch) -> float:
    """A bus's background connect tries come at 0.4 s, 1.2 s, 2.8 s... (a first wait of 0.4 s,
    doubled each try) instead of 1 s, 3 s, 7 s: its first retry wait, in seconds."""
    monkeypatch.setattr(bus_module, "RETRY_S", 0.4)
    return 0.4


def _nats_without_jetstream(port: int, monitor_port: int) -> subprocess.Popen:
    args = [infra.find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor_port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    infra.wait_for_port("127.0.0.1", port, proc=proc)
    return proc


async def _stored(url: str) -> list[str]:
    """The payload names of the events the stream holds, oldest first."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=5)
        sub = await js.subscribe("cnei.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        total = (await js.stream_info(events.STREAM)).state.messages
        return [events.decode((await sub.next_msg(timeout=5)).data).payload["name"] for _ in range(total)]
    finally:
        await nc.close()


def _event_of(name: str, size: int) -> events.Envelope:
    """An event `size` bytes long once encoded (at least its bare envelope's size)."""
    envelope = events.Envelope(type=events.MODEL_LOADED, source="coordinator", payload={"name": name, "pad": ""})
    pad = "x" * max(0, size - len(events.encode(envelope)))
    return events.Envelope(type=envelope.type, source=envelope.source, payload={"name": name, "pad": pad})


def _refused(subject: str, reason: str) -> float:
    return REGISTRY.get_sample_value("cnei_events_refused_total", {"subject": subject, "reason": reason}) or 0.0


def _connections(monitor_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/connz", timeout=5) as reply:
        return json.loads(reply.read())["num_connections"]


async def test_a_bus_started_before_jetstream_is_ready_subscribes_and_comes_online_once_it_is(tmp_path: Path,
                                                                                              quick_retries):
    port = infra.free_port()
    url = f"nats://127.0.0.1:{port}"
    nats_proc = _nats_without_jetstream(port, infra.free_port())
    received, came_online = [], []
    bus = EventBus(url, "runtime/x", outbox=tmp_path / "outbox.jsonl", timeout=1.0)
    publisher = EventBus(url, "registry", timeout=1.0)

    async def handler(envelope: events.Envelope) -> None:
        received.append(envelope.payload["name"])

    async def on_connect() -> None:
        came_online.append(True)

    bus.on_connect.append(on_connect)
    await bus.subscribe(SUBJECT, handler)
    try:
        await bus.start()
        assert not came_online  # NATS answers, JetStream does not
        await bus.publish(SUBJECT, {"name": "while-waiting"})
        await asyncio.sleep(1.5 * quick_retries)  # a try of the background loop fails too
        infra.stop(nats_proc)
        nats_proc = infra.start_nats(port, tmp_path / "store")  # JetStream is there now
        await until(lambda: bus.connected and came_online, 20, "the bus to come online")
        await publisher.connect()
        for name in ("a", "b"):
            await publisher.publish(SUBJECT, {"name": name})
        await until(lambda: {"a", "b"} <= set(received), 5, "the subscriber to get the events")
        assert received.count("while-waiting") == 1 and len(received) == 3  # its own, from the outbox
    finally:
        await publisher.close()
        await bus.close()
        infra.stop(nats_proc)


async def test_a_bus_waiting_for_jetstream_holds_no_connection_open_between_tries(tmp_path: Path, quick_retries):
    port, monitor_port = infra.free_port(), infra.free_port()
    bus = EventBus(f"nats://127.0.0.1:{port}", "runtime/x", timeout=1.0)
    await bus.start()  # no NATS yet: retried in the background
    nats_proc = _nats_without_jetstream(port, monitor_port)
    try:
        await asyncio.sleep(4.5 * quick_retries)  # tries at 0.4 s and 1.2 s: NATS without JetStream, at least the second
        assert not bus.connected
        assert _connections(monitor_port) <= 1  # a try may be under way
    finally:
        await bus.close()
        assert _connections(monitor_port) == 0
        infra.stop(nats_proc)


async def test_a_subscription_made_while_nats_is_away_is_made_when_it_is_back(tmp_path: Path):
    port = infra.free_port()
    url = f"nats://127.0.0.1:{port}"
    nats_proc = infra.start_nats(port, tmp_path / "store")
    received = []
    bus = EventBus(url, "coordinator", timeout=1.0)
    publisher = EventBus(url, "registry", timeout=1.0)

    async def handler(envelope: events.Envelope) -> None:
        received.append(envelope.payload["name"])

    await bus.start()
    try:
        infra.stop(nats_proc)
        await until(lambda: not bus.connected, 10, "the bus to see NATS gone")
        await bus.subscribe(SUBJECT, handler)
        nats_proc = infra.start_nats(port, tmp_path / "store")
        await until(lambda: bus.connected, 20, "the bus to reconnect")
        await publisher.connect()
        await publisher.publish(SUBJECT, {"name": "a"})
        await until(lambda: received, 5, "the subscriber to get the event")
        await asyncio.sleep(0.5)  # a second delivery (a subscription made twice) would be here by now
        assert received == ["a"]
    finally:
        await publisher.close()
        await bus.close()
        infra.stop(nats_proc)


@pytest.mark.parametrize("nats_away", [False, True], ids=["connected", "nats-away"])
async def test_an_event_over_the_servers_max_payload_is_refused_at_publish_and_never_kept(
        small_nats, tmp_path: Path, nats_away: bool):
    bus = EventBus(small_nats, "coordinator", outbox=tmp_path / "outbox.jsonl", timeout=1.0)
    await bus.start()
    try:
        if nats_away:
            await bus.nc.close()  # its limit stays known
        before = _refused(events.INFERENCE_DISAGREEMENT, "too_large")
        with pytest.raises(EventTooLarge) as refused:
            await bus.publish(events.INFERENCE_DISAGREEMENT, {"name": "big", "inputs": [0.5] * 2000})
        assert refused.value.limit_bytes == 4096 and refused.value.size_bytes > 4096
        assert len(bus.outbox) == 0
        assert _refused(events.INFERENCE_DISAGREEMENT, "too_large") == before + 1
    finally:
        await bus.close()


async def test_an_event_the_stream_refuses_is_refused_at_publish_and_not_kept(small_nats, tmp_path: Path):
    bus = EventBus(small_nats, "coordinator", outbox=tmp_path / "outbox.jsonl", timeout=1.0)
    await bus.start()
    try:
        before = _refused(events.INFERENCE_DISAGREEMENT, "refused")
        with pytest.raises(EventRefused, match="message size exceeds maximum"):
            await bus.publish(events.INFERENCE_DISAGREEMENT, {"name": "mid", "inputs": [0.5] * 300})
        assert len(bus.outbox) == 0 and _refused(events.INFERENCE_DISAGREEMENT, "refused") == before + 1
        await bus.publish(events.MODEL_LOADED, {"name": "after"})
        assert await _stored(small_nats) == ["after"]
    finally:
        await bus.close()


async def test_outbox_events_nats_would_never_take_are_dropped_and_the_ones_behind_them_sent(
        small_nats, tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.jsonl")  # as a service left it, or kept before it knew the limit
    for name, size in [("first", 0), ("over-max-payload", 5000), ("over-it-with-its-headers", 4060),
                       ("over-the-streams-limit", 2000), ("last", 0)]:
        outbox.put(events.MODEL_LOADED, _event_of(name, size))
    bus = EventBus(small_nats, "coordinator", outbox=outbox, timeout=1.0)
    await bus.start()
    try:
        await until(lambda: not len(outbox), 10, "the outbox to drain")
        assert await _stored(small_nats) == ["first", "last"]
        assert bus.nc.stats["reconnects"] == 0  # nothing sent that NATS closes the connection for
        assert Outbox(tmp_path / "outbox.jsonl").peek() == []  # gone from the file too
    finally:
        await bus.close()


async def test_events_kept_while_a_full_outbox_is_flushed_are_sent_not_lost(tmp_path: Path):
    port = infra.free_port()
    url = f"nats://127.0.0.1:{port}"
    nats_proc = infra.start_nats(port, tmp_path / "store")
    outbox = Outbox(tmp_path / "outbox.jsonl", max_events=3)
    for name in ("e0", "e1", "e2"):  # kept while NATS was away: the outbox is full
        outbox.put(events.MODEL_LOADED,
                   events.Envelope(type=events.MODEL_LOADED, source="runtime", payload={"name": name}))
    bus = EventBus(url, "runtime", outbox=outbox, timeout=1.0)
    dropped = REGISTRY.get_sample_value("cnei_outbox_dropped_total")

    async def follow_up(envelope: events.Envelope) -> None:  # runs while the flush sends the next one
        await bus.publish(events.MODEL_UNLOADED, {"name": envelope.payload["name"].replace("e", "f")})

    await bus.subscribe(events.MODEL_LOADED, follow_up)
    await bus.start()
    try:
        for _ in range(100):
            if len(stored := await _stored(url)) == 6:
                break
            await asyncio.sleep(0.1)
        assert REGISTRY.get_sample_value("cnei_outbox_dropped_total") > dropped  # it overflowed meanwhile
        assert [name for name in stored if name.startswith("f")] == ["f0", "f1", "f2"], stored
    finally:
        await bus.close()
        infra.stop(nats_proc)
