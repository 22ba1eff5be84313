"""A version deleted from the registry (its cnei.model.deleted event): a runtime keeps serving the
copy it has in memory, offline too, but never loads one it held only on disk again, after a
restart either: the deleted variants leave its disk cache, their bytes once no variant there
names them and no model in memory runs them (a real registry process; the runtime core on its
own, and a runtime process following the registry's events over a real NATS). A runtime that was
stopped or cut off from NATS when the version was deleted forgets it the same way from the
registry's tombstones when it starts or reconnects, only where it holds the tombstone's bytes."""
from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.common.model_spec import ModelVariant
from services.common import settings as cfg
from services.common.errors import CneiError, ErrorCode
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings
from services.registry.core import Registry
from services.registry.store import RegistryStore
from tests.edge_runtime.counting import CountingDiskCache, counted_registry
from tests.edge_runtime.processes import call_registry, infer, loaded, start_runtime, write_mlp
from tests.registry.conftest import serving

OFFLINE = "127.0.0.1:1"  # nothing listens there: UNAVAILABLE


def core(client: RegistryClient, cache: Path) -> EdgeRuntime:
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(cache), intra_op_threads=1,
                       measure_on_load=False)
    return EdgeRuntime(settings, client, DiskCache(cache))


async def stop(runtime: EdgeRuntime) -> None:
    await runtime.drain()
    runtime.close()


def on_disk(cache: Path) -> tuple[set[str], set[str]]:
    """The manifests and the artifacts (sha256) in a disk cache folder."""
    return {p.name for p in cache.glob("*.json")}, {p.stem for p in cache.glob("*.onnx")}


async def test_a_deleted_version_in_memory_serves_on_and_one_only_on_disk_is_not_loaded_again(registry, tmp_path):
    name, client = f"deleted-{uuid.uuid4().hex[:8]}", RegistryClient(registry, timeout=10)
    v1, v2 = [await client.push_file(write_mlp(tmp_path, seed), name, version, "FP32")
              for version, seed in (("1", 11), ("2", 12))]
    runtime = core(client, tmp_path / "cache")
    offline = RegistryClient(OFFLINE, timeout=0.5)
    try:
        for variant in (v1, v2):
            await runtime.load(variant)
        runtime.l1.remove(v1.key)  # version 1 left memory; its artifact stays on disk
        for version in ("1", "2"):
            await client.delete(name, version)
            await runtime.model_deleted(name, version, ["FP32"])  # what its event does
        assert await runtime.load(v2) is runtime.l1.peek(v2.key)
        with pytest.raises(CneiError) as info:
            await runtime.load(v1)
        assert info.value.code is ErrorCode.NOT_FOUND and not runtime.disk.has(v1)
        runtime.registry = offline  # the disk cache resolves
        assert (await runtime.resolve(name)).version == "2"
        with pytest.raises(CneiError) as info:
            await runtime.resolve(name, "1")
        assert info.value.code is ErrorCode.UNAVAILABLE
    finally:
        await stop(runtime)
        await client.close()
        await offline.close()


async def test_a_deleted_variants_bytes_stay_while_another_variant_names_them_or_its_copy_is_in_memory(
        registry, tmp_path):
    name, client = f"deleted-{uuid.uuid4().hex[:8]}", RegistryClient(registry, timeout=10)
    shared, own = write_mlp(tmp_path, 21), write_mlp(tmp_path, 22)
    v1, v2, v3 = [await client.push_file(path, name, version, "FP32")
                  for version, path in (("1", shared), ("2", own), ("3", shared))]  # v3: v1's bytes again
    cache = tmp_path / "cache"
    runtime = core(client, cache)
    try:
        for variant in (v1, v3, v2):
            await runtime.load(variant)
        for key in (v1.key, v3.key):
            runtime.unload(key)  # version 2 stays in memory
        for version in ("1", "2"):
            await client.delete(name, version)
            await runtime.model_deleted(name, version, ["FP32"])
        assert [v.key for v in runtime.disk.variants()] == [v3.key]
        assert on_disk(cache)[1] == {v1.sha256, v2.sha256}  # v3 names v1's bytes; v2 is in memory
        runtime.unload(v2.key)
        await runtime.background.wait()
        assert on_disk(cache) == ({runtime.disk.manifest_path(v3).name}, {v3.sha256})
        assert (await runtime.load(v3)).variant == v3
    finally:
        await stop(runtime)
        await client.close()


def test_a_runtime_restarted_offline_never_serves_a_variant_deleted_while_it_was_in_memory(
        registry, nats_server, redis_server, tmp_path):
    name, cache = f"deleted-{uuid.uuid4().hex[:8]}", tmp_path / "cache"
    shared, own = write_mlp(tmp_path, 31), write_mlp(tmp_path, 32)
    v1, v2, v3 = [call_registry(registry, "push_file", path, name, version, "FP32")
                  for version, path in (("1", shared), ("2", own), ("3", shared))]
    proc, address = start_runtime(registry, nats_server, redis_server, cache,
                                  CNEI_RUNTIME_CACHE_MAX_BYTES=str(v1.size_bytes + 1000))  # one model in memory
    try:
        for version in ("1", "3", "2"):
            assert infer(address, name, version) == version
        assert loaded(address) == {v2.key}
        for version in ("1", "2"):
            call_registry(registry, "delete", name, version)
        infra.wait_until(lambda: on_disk(cache)[0] == {f"{name}+3+FP32.json"}, 10, "the deleted manifests gone")
        assert on_disk(cache)[1] == {v1.sha256, v2.sha256}  # v3 names v1's bytes; v2 is in memory
        assert loaded(address) == {v2.key}
    finally:
        infra.stop(proc)

    proc, address = start_runtime(OFFLINE, nats_server, redis_server, cache)
    try:
        assert on_disk(cache)[1] == {v3.sha256}
        assert infer(address, name) == "3"
        for version in ("1", "2"):
            with pytest.raises(InferenceServerException) as refused:
                infer(address, name, version)
            assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value.message()
    finally:
        infra.stop(proc)


async def test_a_version_pushed_again_after_its_deletion_is_served_again(registry, tmp_path):
    name, client = f"deleted-{uuid.uuid4().hex[:8]}", RegistryClient(registry, timeout=10)
    path = write_mlp(tmp_path, 31)
    v1 = await client.push_file(path, name, "1", "FP32")
    runtime = core(client, tmp_path / "cache")
    try:
        await runtime.load(v1)
        runtime.l1.remove(v1.key)
        await client.delete(name, "1")
        await runtime.model_deleted(name, "1", ["FP32"])
        again = await client.push_file(write_mlp(tmp_path, 32), name, "1", "FP32")  # no event reaches it
        resolved = await runtime.resolve(name, "1", "FP32")
        assert resolved.sha256 == again.sha256
        assert await runtime.load(resolved) is runtime.l1.peek(again.key)
        assert runtime.disk.has(again)
    finally:
        await stop(runtime)
        await client.close()


def cache_three_versions(registry: str, nats: str, redis_server: str, tmp_path: Path, seed: int):
    """Versions 1 and 2 of a fresh model (their own bytes) and 3 (version 1's bytes again),
    each served once by a runtime process over `nats` holding one model in memory (version 2
    last): (name, the variants, the cache folder, the runtime process, its address)."""
    name, cache = f"deleted-{uuid.uuid4().hex[:8]}", tmp_path / "cache"
    shared, own = write_mlp(tmp_path, seed), write_mlp(tmp_path, seed + 1)
    variants = [call_registry(registry, "push_file", path, name, version, "FP32")
                for version, path in (("1", shared), ("2", own), ("3", shared))]
    proc, address = start_runtime(registry, nats, redis_server, cache,
                                  CNEI_RUNTIME_CACHE_MAX_BYTES=str(variants[0].size_bytes + 1000))
    try:
        for version in ("1", "3", "2"):
            assert infer(address, name, version) == version
    except BaseException:
        infra.stop(proc)
        raise
    return name, variants, cache, proc, address


def serves_offline_only_version_3(name: str, nats: str, redis_server: str, cache: Path) -> None:
    """A runtime restarted over `cache` with the registry out of reach serves version 3 and
    neither deleted version."""
    proc, address = start_runtime(OFFLINE, nats, redis_server, cache)
    try:
        assert infer(address, name) == "3" and infer(address, name, "3") == "3"
        for version in ("1", "2"):
            with pytest.raises(InferenceServerException) as refused:
                infer(address, name, version)
            assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value.message()
    finally:
        infra.stop(proc)


def forgotten_but_version_3(name: str, cache: Path, variants: list[ModelVariant]) -> None:
    """Within 20 s the deleted versions' manifests leave the cache, and their bytes but those
    version 3 names (version 1's)."""
    left = ({f"{name}+3+FP32.json"}, {variants[2].sha256})
    infra.wait_until(lambda: on_disk(cache) == left, 20, "the deleted versions gone")


@pytest.mark.parametrize("nats_at_restart", ["up", "away"])
def test_a_runtime_stopped_while_versions_were_deleted_forgets_them_when_it_starts_again(
        registry, nats_server, redis_server, tmp_path, nats_at_restart):
    name, variants, cache, proc, _ = cache_three_versions(registry, nats_server, redis_server, tmp_path, 41)
    infra.stop(proc)
    for version in ("1", "2"):
        call_registry(registry, "delete", name, version)  # announced while no runtime listens
    nats = nats_server if nats_at_restart == "up" else "nats://127.0.0.1:1"
    proc, address = start_runtime(registry, nats, redis_server, cache)
    try:
        forgotten_but_version_3(name, cache, variants)
        assert infer(address, name) == "3"
    finally:
        infra.stop(proc)
    serves_offline_only_version_3(name, nats_server, redis_server, cache)


def test_a_runtime_cut_off_from_nats_while_versions_were_deleted_forgets_them_when_it_reconnects(
        registry, redis_server, tmp_path):
    port = infra.free_port()
    own_nats = infra.start_nats(port, tmp_path / "nats")  # the registry announces on another one
    try:
        name, variants, cache, proc, address = cache_three_versions(
            registry, f"nats://127.0.0.1:{port}", redis_server, tmp_path, 51)
        try:
            for version in ("1", "2"):
                call_registry(registry, "delete", name, version)
            assert len(on_disk(cache)[0]) == 3  # never told
            infra.stop(own_nats)
            own_nats = infra.start_nats(port, tmp_path / "nats")
            forgotten_but_version_3(name, cache, variants)
            # the resync loads the version served in place of version 2 (its bytes go as it leaves)
            assert loaded(address) == {variants[2].key}
        finally:
            infra.stop(proc)
    finally:
        infra.stop(own_nats)
    serves_offline_only_version_3(name, f"nats://127.0.0.1:{port}", redis_server, cache)


async def test_a_version_deleted_and_pushed_again_with_the_same_bytes_is_kept_at_a_resync(registry, tmp_path):
    name, client = f"deleted-{uuid.uuid4().hex[:8]}", RegistryClient(registry, timeout=10)
    path = write_mlp(tmp_path, 61)
    v1 = await client.push_file(path, name, "1", "FP32")
    runtime = core(client, tmp_path / "cache")
    offline = RegistryClient(OFFLINE, timeout=0.5)
    try:
        await runtime.load(v1)
        runtime.unload(v1.key)
        await client.delete(name, "1")  # no event reaches it
        await client.push_file(path, name, "1", "FP32")  # its tombstone goes
        await runtime.resync()
        assert runtime.disk.has(v1)
        runtime.registry = offline
        assert (await runtime.resolve(name, "1")).sha256 == v1.sha256
    finally:
        await stop(runtime)
        await client.close()
        await offline.close()


async def test_a_tombstone_read_before_a_push_of_other_bytes_leaves_the_variant_pushed_again(registry, tmp_path):
    name, client = f"deleted-{uuid.uuid4().hex[:8]}", RegistryClient(registry, timeout=10)
    v1 = await client.push_file(write_mlp(tmp_path, 71), name, "1", "FP32")
    runtime = core(client, tmp_path / "cache")
    try:
        await runtime.load(v1)
        runtime.unload(v1.key)
        await client.delete(name, "1")
        tombstones = await client.deleted(name)  # read, then overtaken by a push of the same version
        again = await client.push_file(write_mlp(tmp_path, 72), name, "1", "FP32")
        await runtime.load(await runtime.resolve(name, "1"))
        runtime.unload(again.key)
        assert [t.sha256 for t in tombstones] == [v1.sha256] and runtime.disk.has(again)
        assert await runtime.apply_tombstones(tombstones) == []
        assert runtime.disk.has(again) and (await runtime.load(again)).variant == again
    finally:
        await stop(runtime)
        await client.close()


async def test_a_registry_that_never_heard_of_a_cached_model_makes_a_resync_forget_nothing(registry, tmp_path):
    name, client = f"deleted-{uuid.uuid4().hex[:8]}", RegistryClient(registry, timeout=10)
    v1 = await client.push_file(write_mlp(tmp_path, 81), name, "1", "FP32")
    runtime = core(client, tmp_path / "cache")
    try:
        await runtime.load(v1)
        runtime.unload(v1.key)
        async with serving(Registry(RegistryStore(tmp_path / "restored-empty"))) as address:
            runtime.registry = RegistryClient(address, timeout=10)  # no tombstone, nor the model
            try:
                await runtime.resync()
            finally:
                await runtime.registry.close()
        assert runtime.disk.has(v1)
    finally:
        await stop(runtime)
        await client.close()


async def test_a_catch_up_asks_the_registry_once_and_sweeps_the_disk_cache_once_for_every_tombstone(tmp_path):
    names = [f"deleted-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    async with counted_registry(tmp_path / "registry") as (address, calls):
        client = RegistryClient(address, timeout=10)
        settings = replace(cfg.load(RuntimeSettings, PREFIX), intra_op_threads=1, measure_on_load=False)
        runtime = EdgeRuntime(settings, client, CountingDiskCache(tmp_path / "cache"))
        try:
            pushed = {(name, version): await client.push_file(write_mlp(tmp_path, 90 + seed), name, version, "FP32")
                      for seed, (name, version) in enumerate((n, v) for n in names for v in ("1", "2"))}
            for variant in pushed.values():
                await runtime.load(variant)
                runtime.unload(variant.key)
            for name in names[:2]:
                await client.delete(name, "1")  # no event reaches it
            calls.clear()
            assert await runtime.forget_deleted()
            assert calls["ListDeleted"] == 1 and runtime.disk.sweeps == 1
            assert sorted(v.key for v in runtime.disk.variants()) == sorted(
                v.key for (name, version), v in pushed.items() if version == "2" or name == names[2])
        finally:
            await stop(runtime)
            await client.close()
