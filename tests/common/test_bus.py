"""The event bus against NATS servers of the test's own: a service that starts while NATS answers
but its JetStream does not (a cluster still electing its leader) subscribes once JetStream is
there, holding no connection meanwhile."""
from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from pathlib import Path

from services.cli import infra
from services.common import events
from services.common.bus import EventBus

SUBJECT = events.MODEL_PUBLISHED


def _nats_without_jetstream(port: int, monitor_port: int) -> subprocess.Popen:
    args = [infra.find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor_port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    infra.wait_for_port("127.0.0.1", port, proc=proc)
    return proc


def _connections(monitor_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/connz", timeout=5) as reply:
        return json.loads(reply.read())["num_connections"]


async def _until(predicate, timeout: float, what: str) -> None:
    for _ in range(int(timeout / 0.1)):
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_bus_started_before_jetstream_is_ready_subscribes_and_comes_online_once_it_is(tmp_path: Path):
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
        await asyncio.sleep(1.5)  # a try of the background loop fails too
        infra.stop(nats_proc)
        nats_proc = infra.start_nats(port, tmp_path / "store")  # JetStream is there now
        await _until(lambda: bus.connected and came_online, 20, "the bus to come online")
        await publisher.connect()
        for name in ("a", "b"):
            await publisher.publish(SUBJECT, {"name": name})
        await _until(lambda: {"a", "b"} <= set(received), 5, "the subscriber to get the events")
        assert received.count("while-waiting") == 1 and len(received) == 3  # its own, from the outbox
    finally:
        await publisher.close()
        await bus.close()
        infra.stop(nats_proc)


async def test_a_bus_waiting_for_jetstream_holds_no_connection_open_between_tries(tmp_path: Path):
    port, monitor_port = infra.free_port(), infra.free_port()
    bus = EventBus(f"nats://127.0.0.1:{port}", "runtime/x", timeout=1.0)
    await bus.start()  # no NATS yet: retried in the background
    nats_proc = _nats_without_jetstream(port, monitor_port)
    try:
        await asyncio.sleep(4.5)  # tries at 1 s and 3 s found NATS without JetStream
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
        await _until(lambda: not bus.connected, 10, "the bus to see NATS gone")
        await bus.subscribe(SUBJECT, handler)
        nats_proc = infra.start_nats(port, tmp_path / "store")
        await _until(lambda: bus.connected, 20, "the bus to reconnect")
        await publisher.connect()
        await publisher.publish(SUBJECT, {"name": "a"})
        await _until(lambda: received, 5, "the subscriber to get the event")
        await asyncio.sleep(0.5)  # a second delivery (a subscription made twice) would be here by now
        assert received == ["a"]
    finally:
        await publisher.close()
        await bus.close()
        infra.stop(nats_proc)
