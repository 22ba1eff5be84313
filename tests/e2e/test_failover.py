"""Resilience end to end: kill -9 of an edge runtime under tritonclient load loses no request."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import nats
import numpy as np
import tritonclient.grpc as triton

from services.cli import infra
from services.models.digits import load_all


def _start_runtime(mesh, node_id: str, region: str, tmp_path) -> tuple[subprocess.Popen, int]:
    port = infra.free_port()
    env = {**os.environ, "CNEI_RUNTIME_NODE_ID": node_id, "CNEI_RUNTIME_TIER": "edge",
           "CNEI_RUNTIME_REGION": region, "CNEI_RUNTIME_PORT": str(port),
           "CNEI_RUNTIME_METRICS_PORT": "0", "CNEI_RUNTIME_REGISTRY_TARGET": mesh.registry,
           "CNEI_RUNTIME_REDIS_URL": mesh.settings.redis_url, "CNEI_RUNTIME_NATS_URL": mesh.settings.nats_url,
           "CNEI_RUNTIME_CACHE_DIR": str(tmp_path / node_id), "CNEI_RUNTIME_PRELOAD": "digits"}
    proc = subprocess.Popen([sys.executable, "-m", "services.edge_runtime"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    infra.wait_for_port("127.0.0.1", port, proc=proc, timeout=30)
    return proc, port


class Load:
    """Closed-loop tritonclient load from several threads; records every outcome."""

    def __init__(self, address: str, threads: int, region: str):
        self.address, self.threads, self.region = address, threads, region
        self.results: list[tuple[float, float, str]] = []  # (start, latency, node)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        client = triton.InferenceServerClient(self.address)
        x, _ = load_all()
        i = index
        while not self._stop.is_set():
            sample = x[i % len(x)][None, :]
            tensor = triton.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(sample)
            start = time.monotonic()
            try:
                reply = client.infer("digits", [tensor], parameters={"region": self.region},
                                     client_timeout=10)
                node = reply.get_response().parameters["cnei_node"].string_param
                with self._lock:
                    self.results.append((start, time.monotonic() - start, node))
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            i += self.threads

    def __enter__(self):
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for w in self._workers:
            w.join(timeout=30)


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
    proc, _ = _start_runtime(mesh, "edge-a2", "site-a", tmp_path)
    seen: list = []
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    collector = threading.Thread(target=loop.run_until_complete,
                                 args=(_collect(mesh.settings.nats_url, "cnei.node.down", seen, stop),))
    collector.start()
    try:
        time.sleep(1.5)  # the coordinator sees the new node
        with Load(mesh.coordinator, threads=6, region="site-a") as load:
            time.sleep(3.0)
            served_by_victim = sum(1 for r in load.results if r[2] == "edge-a2")
            killed_at = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            time.sleep(4.0)
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
