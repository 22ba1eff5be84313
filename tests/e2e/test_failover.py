"""Resilience end to end: kill -9 of an edge runtime under tritonclient load loses no request."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import nats
import numpy as np

from tests.e2e.processes import kill_under_load, start_runtime


async def _collect(url: str, subject: str, sink: list, stop: asyncio.Event) -> None:
    nc = await nats.connect(url)
    sub = await nc.subscribe(subject)
    while not stop.is_set():
        try:
            msg = await sub.next_msg(timeout=0.2)
        except nats.errors.TimeoutError:
            continue
        sink.append((time.monotonic(), json.loads(msg.data)))
    await nc.close()


def test_kill_9_of_an_edge_runtime_under_load_fails_no_request(mesh, tmp_path):
    proc, _ = start_runtime(mesh, "edge-a2", "site-a", tmp_path)
    seen: list = []
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    collector = threading.Thread(target=loop.run_until_complete,
                                 args=(_collect(mesh.settings.nats_url, "cnei.node.down", seen, stop),))
    collector.start()
    try:
        load, served_by_victim, killed_at = kill_under_load(mesh.coordinator, proc, "edge-a2", "site-a", 3.0, 4.0)
    finally:
        loop.call_soon_threadsafe(stop.set)
        collector.join(timeout=10)
        if proc.poll() is None:
            proc.kill()
    assert served_by_victim > 0, "the victim never took traffic; the test proves nothing"
    assert load.errors == [], f"{len(load.errors)} failed requests: {load.errors[:3]}"
    window = [lat for start, lat, _ in load.results if killed_at - 0.2 <= start <= killed_at + 1.5]
    after = [r for r in load.results if r[0] >= killed_at + 1.0]
    print(f"\nfailover: {len(load.results)} requests, 0 failed; p99 in the 1.5 s failure window "
          f"{np.percentile(window, 99) * 1e3:.1f} ms over {len(window)} requests")
    assert after and all(node != "edge-a2" for _, _, node in after)
    downs = [(t, e) for t, e in seen if e["payload"]["node_id"] == "edge-a2"]
    assert downs, "no cnei.node.down event for the killed node"
    assert downs[0][0] - killed_at < 1.5
