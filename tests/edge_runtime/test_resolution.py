"""A runtime's resolutions past their lifetime while its registry stops answering (a real registry
gRPC server whose answers stall past the client's deadline): the last answer serves at once and
is read again in the background."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import replace

import pytest

from services.common import settings as cfg
from services.common.deployment import DeploymentSpec
from services.common.registry_client import RegistryClient
from services.edge_runtime import resolution
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings
from tests.edge_runtime.counting import counted_registry
from tests.edge_runtime.processes import write_mlp

TTL_S = 0.2
CLIENT_TIMEOUT_S = 1.0
STALLED = ("ResolveModel", "GetDeployment", "ListModels")


@pytest.fixture
def short_lived(monkeypatch):
    monkeypatch.setattr(resolution, "RESOLVE_TTL_S", TTL_S)
    monkeypatch.setattr(resolution, "DEPLOYMENT_TTL_S", TTL_S)


@pytest.mark.parametrize("version", ["", "1"], ids=["naming-no-version", "naming-its-version"])
async def test_a_resolution_past_its_lifetime_serves_at_once_while_the_registry_stalls(tmp_path, short_lived, version):
    name = f"stalled-{uuid.uuid4().hex[:8]}"
    stalls = Counter()
    async with counted_registry(tmp_path / "registry", stalls, stall_s=3 * CLIENT_TIMEOUT_S) as (address, calls):
        client = RegistryClient(address, timeout=CLIENT_TIMEOUT_S)
        runtime = EdgeRuntime(replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path / "cache"),
                                      measure_on_load=False), client, DiskCache(tmp_path / "cache"))
        try:
            await runtime.load(await client.push_file(write_mlp(tmp_path, 1), name, "1", "FP32"))
            await client.put_deployment(DeploymentSpec(model=name))
            assert (await runtime.resolve(name, version)).version == "1"
            stalls.update({method: 1000 for method in STALLED})
            took = []
            for _ in range(10):  # each past the resolution's lifetime
                await asyncio.sleep(1.5 * TTL_S)
                began = time.monotonic()
                assert (await runtime.resolve(name, version)).version == "1"
                took.append(time.monotonic() - began)
            assert max(took) < 0.2 * CLIENT_TIMEOUT_S, took
            assert calls["ResolveModel"] >= 2  # read again, in the background
        finally:
            stalls.clear()
            await runtime.background.wait()
            await runtime.drain()
            runtime.close()
            await client.close()
