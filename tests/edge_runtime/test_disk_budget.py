"""The disk cache's byte budget, in a real runtime process against a real registry process: the
least recently used artifacts leave to make room, never one in memory or the newest of a model,
a pull that cannot fit is RESOURCE_EXHAUSTED, and what stays serves offline."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.common import events
from services.common.outbox import Outbox
from tests.edge_runtime.processes import call_registry, infer, loaded, start_runtime, write_mlp

BIG_LAYERS = (64, 512, 512, 10)  # ~1.2 MB


def disk_bytes(cache: Path) -> int:
    """Bytes of artifacts and manifests in the cache folder (the outbox left out)."""
    return sum(p.stat().st_size for p in cache.iterdir() if p.suffix in (".onnx", ".json"))


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        found = re.search(rf"^{name} (\S+)$", reply.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def versions(registry, tmp_path):
    """A fresh model with versions 1-4 (distinct bytes, one size) and a model too big for the budget."""
    name, big = f"budget-{uuid.uuid4().hex[:8]}", f"big-{uuid.uuid4().hex[:8]}"
    for version in range(1, 5):
        call_registry(registry, "push_file", write_mlp(tmp_path, version), name, str(version), "FP32")
    call_registry(registry, "push_file", write_mlp(tmp_path, 9, BIG_LAYERS), big, "1", "FP32")
    return name, big, write_mlp(tmp_path, 1).stat().st_size


def test_a_runtime_keeps_its_disk_cache_within_budget_and_serves_what_stays_offline(
        registry, nats_server, redis_server, tmp_path, versions):
    name, big, size = versions
    cache, budget, metrics_port = tmp_path / "cache", size * 5 // 2, infra.free_port()  # two artifacts fit
    proc, address = start_runtime(registry, nats_server, redis_server, cache,
                                  CNEI_RUNTIME_METRICS_PORT=str(metrics_port),
                                  CNEI_RUNTIME_DISK_CACHE_MAX_BYTES=str(budget),
                                  CNEI_RUNTIME_CACHE_MAX_BYTES=str(size + 1000))  # one model in memory
    try:
        for version in "1234":  # from v3 on, each pull evicts the least recent version not in memory
            assert infer(address, name, version) == version
            assert disk_bytes(cache) <= budget
        assert loaded(address) == {f"{name}:4:FP32"}
        assert sorted(p.name for p in cache.glob("*.json")) == [f"{name}+3+FP32.json", f"{name}+4+FP32.json"]
        assert metric(metrics_port, "cnei_disk_cache_evictions_total") == 2
        assert metric(metrics_port, "cnei_disk_cache_bytes") == disk_bytes(cache)

        with pytest.raises(InferenceServerException) as refused:  # v3 could go, v4 (in memory, newest) not
            infer(address, big)
        status, message = refused.value.status(), refused.value.message()
        assert status == "StatusCode.RESOURCE_EXHAUSTED", (status, message)
        needs = re.search(rf"the artifact of {big}:1:FP32 needs (\d+) bytes", message)
        assert needs and int(needs.group(1)) >= call_registry(registry, "resolve", big).size_bytes, message
        assert f"budget of {budget} bytes" in message, message
        assert sorted(p.name for p in cache.glob("*.json")) == [f"{name}+3+FP32.json", f"{name}+4+FP32.json"]
        assert not list(cache.glob("*.tmp")) and disk_bytes(cache) <= budget
    finally:
        infra.stop(proc)

    proc, address = start_runtime("127.0.0.1:1", nats_server, redis_server, cache)  # the registry out of reach
    try:
        assert infer(address, name) == "4"  # the newest version cached
        assert infer(address, name, "3") == "3"
    finally:
        infra.stop(proc)


def test_a_runtime_cut_off_from_nats_keeps_its_outbox_within_its_byte_bound_newest_events_kept(
        registry, redis_server, tmp_path):
    cache, bound, metrics_port = tmp_path / "cache", 4000, infra.free_port()  # a few metrics snapshots
    proc, _ = start_runtime(registry, f"nats://127.0.0.1:{infra.free_port()}", redis_server, cache,  # no NATS there
                            CNEI_RUNTIME_METRICS_PORT=str(metrics_port), CNEI_RUNTIME_METRICS_INTERVAL_S="0.05",
                            CNEI_RUNTIME_OUTBOX_MAX_BYTES=str(bound))
    outbox = cache / "outbox.jsonl"
    try:
        infra.wait_until(lambda: metric(metrics_port, "cnei_outbox_dropped_total") >= 10, 20, "snapshots dropped")
        assert 0 < metric(metrics_port, "cnei_outbox_bytes") <= bound
    finally:
        infra.stop(proc)
    assert outbox.stat().st_size < 1.5 * bound  # the kept events after a front of dropped ones, cut now and then
    kept = Outbox(outbox, max_bytes=bound).peek(1000)
    seqs = [entry.envelope.payload["seq"] for entry in kept if entry.subject == events.NODE_METRICS]
    assert len(seqs) > 1 and seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] > 1  # the newest, in order


@pytest.mark.parametrize("variable", ["CNEI_RUNTIME_OUTBOX_MAX_BYTES", "CNEI_RUNTIME_DISK_CACHE_MAX_BYTES"])
def test_a_runtime_with_a_negative_byte_bound_does_not_start_and_names_it(variable, tmp_path):
    env = {**os.environ, "CNEI_RUNTIME_PORT": str(infra.free_port()), "CNEI_RUNTIME_METRICS_PORT": "0",
           "CNEI_RUNTIME_CACHE_DIR": str(tmp_path / "cache"), variable: "-1"}
    out = subprocess.run([sys.executable, "-m", "services.edge_runtime"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0
    assert f"{variable} (-1) must be 0 or more" in out.stderr
