"""A version deleted from the registry (its cnei.model.deleted event): a runtime keeps serving the
copy it has in memory, offline too, but never loads one it holds only on disk again (a real
registry process; the runtime core on its own)."""
from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from services.common import settings as cfg
from services.common.errors import CneiError, ErrorCode
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings
from tests.edge_runtime.processes import write_mlp


async def test_a_deleted_version_in_memory_serves_on_and_one_only_on_disk_is_not_loaded_again(registry, tmp_path):
    name, client = f"deleted-{uuid.uuid4().hex[:8]}", RegistryClient(registry, timeout=10)
    v1, v2 = [await client.push_file(write_mlp(tmp_path, seed), name, version, "FP32")
              for version, seed in (("1", 11), ("2", 12))]
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path / "cache"), intra_op_threads=1,
                       measure_on_load=False)
    runtime = EdgeRuntime(settings, client, DiskCache(tmp_path / "cache"))
    offline = RegistryClient("127.0.0.1:1", timeout=0.5)  # nothing listens there: UNAVAILABLE
    try:
        for variant in (v1, v2):
            await runtime.load(variant)
        runtime.l1.remove(v1.key)  # version 1 left memory; its artifact stays on disk
        for version in ("1", "2"):
            await client.delete(name, version)
            runtime.model_deleted(name, version, ["FP32"])  # what its event does
        assert await runtime.load(v2) is runtime.l1.peek(v2.key)
        with pytest.raises(CneiError) as info:
            await runtime.load(v1)
        assert info.value.code is ErrorCode.NOT_FOUND and runtime.disk.has(v1)
        runtime.registry = offline  # the disk cache resolves
        assert (await runtime.resolve(name)).version == "2"
        with pytest.raises(CneiError) as info:
            await runtime.resolve(name, "1")
        assert info.value.code is ErrorCode.UNAVAILABLE
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()
        await offline.close()
