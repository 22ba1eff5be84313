"""Pushes' ONNX checks (each up to ~2.25 × its artifact in memory) run at most
CNEI_REGISTRY_CONCURRENT_CHECKS at once; more pushes wait their turn and all succeed. A real gRPC
registry server in this process, whose check (the real one) records when it runs."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from services.common.registry_client import RegistryClient
from services.models.onnx_mlp import mlp_graph
from services.registry import core
from services.registry.core import Registry
from services.registry.store import RegistryStore
from tests.registry.conftest import serving

CHECK_S = 0.4  # each check held this long, so checks allowed at once do overlap


@pytest.fixture
def check_spans(monkeypatch) -> list[tuple[float, float]]:
    """The (start, end) of each push's ONNX check, the real check held CHECK_S longer."""
    spans, lock, inspect = [], threading.Lock(), core.inspect_onnx

    def timed(path):
        start = time.monotonic()
        try:
            time.sleep(CHECK_S)
            return inspect(path)
        finally:
            with lock:
                spans.append((start, time.monotonic()))
    monkeypatch.setattr(core, "inspect_onnx", timed)
    return spans


def _artifact(path, seed: int):
    weights = np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32)
    path.write_bytes(mlp_graph([weights], [np.zeros(3, np.float32)], name="tiny").SerializeToString())
    return path


def _overlap(spans: list[tuple[float, float]]) -> bool:
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    return b_start < a_end


@pytest.mark.parametrize("concurrent_checks, overlapping", [(1, False), (2, True)])
async def test_concurrent_pushes_check_at_most_the_setting_at_once_and_all_are_stored(
        tmp_path, check_spans, concurrent_checks, overlapping):
    store = RegistryStore(tmp_path / "data")
    files = [_artifact(tmp_path / f"m{seed}.onnx", seed) for seed in (1, 2)]
    async with serving(Registry(store, concurrent_checks=concurrent_checks)) as address:
        client = RegistryClient(address, timeout=30)
        try:
            pushed = await asyncio.gather(*(client.push_file(f, f"m{i}", "1", "FP32") for i, f in enumerate(files)))
            assert sorted(v.name for v in pushed) == ["m0", "m1"]
            assert {v.name for v in await client.list()} >= {"m0", "m1"}
        finally:
            await client.close()
    store.close()
    assert len(check_spans) == 2 and _overlap(check_spans) == overlapping, check_spans
