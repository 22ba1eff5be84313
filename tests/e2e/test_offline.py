"""Offline autonomy with a real partition: NATS, Redis and the registry stop; the edge keeps
serving its cache, buffers events on disk, and on reconnect re-registers, flushes in order and
pulls the version it missed."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nats
import numpy as np
import pytest
import tritonclient.grpc as triton
from redis import Redis

from services.cli import infra
from services.common import events
from services.common.nodes import NODE_KEY
from services.common.registry_client import RegistryClient
from services.models.digits import load_all


class Site:
    """NATS, Redis, registry and one edge runtime, each restartable on the same port and data."""

    def __init__(self, root: Path):
        self.root = root
        self.nats_port, self.redis_port = infra.free_port(), infra.free_port()
        self.registry_port, self.edge_port = infra.free_port(), infra.free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_nats(self) -> None:
        self.procs["nats"] = infra.start_nats(self.nats_port, self.root / "nats")

    def start_redis(self) -> None:
        self.procs["redis"] = infra.start_redis(self.redis_port, self.root / "redis")

    def _service(self, name: str, module: str, env: dict, port: int) -> None:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", module], env={**os.environ, **env},
                                stdout=log, stderr=subprocess.STDOUT)
        infra.wait_for_port("127.0.0.1", port, proc=proc, timeout=30)
        self.procs[name] = proc

    def start_registry(self) -> None:
        self._service("registry", "services.registry", {
            "CNEI_REGISTRY_PORT": str(self.registry_port), "CNEI_REGISTRY_METRICS_PORT": "0",
            "CNEI_REGISTRY_DATA_DIR": str(self.root / "registry"), "CNEI_REGISTRY_NATS_URL": self.nats_url,
        }, self.registry_port)

    def start_edge(self) -> None:
        self._service("edge", "services.edge_runtime", {
            "CNEI_RUNTIME_NODE_ID": "edge-off", "CNEI_RUNTIME_PORT": str(self.edge_port),
            "CNEI_RUNTIME_METRICS_PORT": "0", "CNEI_RUNTIME_REGISTRY_TARGET": f"127.0.0.1:{self.registry_port}",
            "CNEI_RUNTIME_REDIS_URL": self.redis_url, "CNEI_RUNTIME_NATS_URL": self.nats_url,
            "CNEI_RUNTIME_CACHE_DIR": str(self.root / "cache"), "CNEI_RUNTIME_METRICS_INTERVAL_S": "0.3",
        }, self.edge_port)

    def stop(self, name: str) -> None:
        infra.stop(self.procs.pop(name))

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    s.start_nats()
    s.start_redis()
    s.start_registry()
    s.start_edge()
    yield s
    s.stop_all()


def _push(site: Site, path: Path, version: str) -> None:
    async def go():
        client = RegistryClient(f"127.0.0.1:{site.registry_port}")
        try:
            await client.push_file(path, "digits", version, "FP32", {"accuracy": "0.97"})
        finally:
            await client.close()
    asyncio.run(go())


def _infer(address: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    client = triton.InferenceServerClient(address)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    reply = client.infer("digits", [tensor], client_timeout=10)
    return reply.as_numpy("probabilities"), reply.get_response().model_version




async def _metrics_events(url: str) -> list[dict]:
    """Every metrics event stored in JetStream up to now (the node keeps publishing)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    last = (await js.stream_info(events.STREAM)).state.last_seq
    sub = await js.subscribe("cnei.node.metrics", ordered_consumer=True)
    out = []
    while True:
        try:
            msg = await sub.next_msg(timeout=2.0)
        except nats.errors.TimeoutError:
            break
        out.append(json.loads(msg.data))
        if msg.metadata.sequence.stream >= last:
            break
    await nc.close()
    return [e for e in out if e["payload"]["node_id"] == "edge-off"]


def test_an_edge_cut_off_from_the_cloud_keeps_serving_and_resyncs(site, digits_models):
    fp32 = next(b for b in digits_models if b.precision == "FP32")
    _push(site, fp32.path, "1")
    address = f"127.0.0.1:{site.edge_port}"
    x, y = load_all()
    probs, version = _infer(address, x[:64])
    assert version == "1" and (probs.argmax(1) == y[:64]).mean() > 0.9

    for name in ("registry", "redis", "nats"):
        site.stop(name)
    served = 0
    partition_end = time.monotonic() + 3.0
    while time.monotonic() < partition_end:  # clients reaching the edge directly still get answers
        probs, version = _infer(address, x[:32])
        assert version == "1" and (probs.argmax(1) == y[:32]).mean() > 0.9
        served += 1
    assert served > 5
    outbox = site.root / "cache" / "outbox.jsonl"
    buffered = infra.wait_until(lambda: outbox.exists() and len(outbox.read_text().splitlines()), 5,
                                "buffered events", poll_s=0.2)
    assert buffered >= 3

    site.start_registry()  # the cloud comes back first and publishes v2 while NATS is still down
    _push(site, fp32.path.with_name(fp32.path.name), "2")
    site.start_redis()
    site.start_nats()

    redis = Redis.from_url(site.redis_url)
    infra.wait_until(lambda: redis.get(NODE_KEY.format("edge-off")), 10, "re-registration in Redis", poll_s=0.2)
    infra.wait_until(lambda: (site.root / "cache" / "digits+2+FP32.json").exists(), 15,
                     "missed version pulled", poll_s=0.2)
    infra.wait_until(lambda: not outbox.exists() or not outbox.read_text().strip(), 15, "outbox flushed",
                     poll_s=0.2)
    seqs = [e["payload"]["seq"] for e in asyncio.run(_metrics_events(site.nats_url))]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "events lost or out of order"
    assert len(seqs) >= buffered
    probs, version = _infer(address, x[:64])
    assert version == "2"
