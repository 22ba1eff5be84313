"""The runtime core on its own (no gRPC server): how it resolves models, keeps them in memory
and runs them."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.common import oip
from services.common import settings as cfg
from services.common.deployment import BatchingSpec, DeploymentSpec, RolloutSpec
from services.common.errors import CneiError, ErrorCode
from services.common.model_spec import ModelVariant, TensorSpec
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings
from tests.edge_runtime.counting import counted_registry
from tests.edge_runtime.processes import write_mlp
from tests.retrained import write_versions

ARTIFACT = b"pretend this is an ONNX model"


def _variant() -> ModelVariant:
    return ModelVariant(
        name="digits", version="1", precision="FP32", sha256=hashlib.sha256(ARTIFACT).hexdigest(),
        size_bytes=len(ARTIFACT), inputs=[TensorSpec("input", "FP32", (-1, 64))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))])


class _CountingDisk(DiskCache):
    """A real disk cache that counts how often its manifests are read."""

    reads = 0

    def variants(self) -> list[ModelVariant]:
        self.reads += 1
        return super().variants()


async def test_a_runtime_cut_off_from_the_registry_reads_its_disk_cache_once_per_retry_window(tmp_path):
    disk = _CountingDisk(tmp_path)
    disk.put(_variant(), ARTIFACT)
    registry = RegistryClient("127.0.0.1:1", timeout=0.5)  # nothing listens there: UNAVAILABLE
    runtime = EdgeRuntime(replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path)), registry, disk)
    try:
        for _ in range(50):  # a request each: served from what the disk cache said the first time
            assert (await runtime.resolve("digits")).version == "1"
        assert disk.reads == 1
        runtime.forget_resolutions()  # back online (resync) or told of a new version: asked again
        await runtime.resolve("digits")
        assert disk.reads == 2
    finally:
        runtime.close()
        await registry.close()


async def test_a_model_evicted_while_its_request_asks_the_registry_keeps_no_batcher(registry, push_digits, tmp_path):
    x, y = await push_digits("x"), await push_digits("y")
    client = RegistryClient(registry, timeout=10)
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path), inline_max_us=0.0,
                       intra_op_threads=1, measure_on_load=False, cache_max_bytes=x.size_bytes + 10)  # one fits
    runtime = EdgeRuntime(settings, client, DiskCache(tmp_path))
    asked, answer, held = asyncio.Event(), asyncio.Event(), set()
    real_get_deployment = client.get_deployment

    async def slow_get_deployment(name: str):  # X's next cap round trip takes until `answer`
        if name in held:
            held.discard(name)
            asked.set()
            await asyncio.wait_for(answer.wait(), 10)
        return await real_get_deployment(name)
    client.get_deployment = slow_get_deployment
    row = {"input": np.ones((1, 64), np.float32)}
    try:
        await asyncio.wait_for(runtime.infer(oip.InferRequest(x.name, row)), 10)  # X loaded, its batcher made
        assert [key for key, _ in runtime.batchers] == [x.key]
        runtime.deployment_updated(x.name)  # the next X request asks the registry for the cap again...
        held.add(x.name)  # ...and waits for its answer
        # (its version named: a request naming none asks for the deployment first, to learn its stable version)
        pending = asyncio.create_task(runtime.infer(oip.InferRequest(x.name, row, model_version=x.version)))
        await asyncio.wait_for(asked.wait(), 10)  # X came from L1; its request waits for the cap
        await asyncio.wait_for(runtime.infer(oip.InferRequest(y.name, row)), 10)  # Y evicts X, retires its batchers
        answer.set()
        reply = await asyncio.wait_for(pending, 10)
        assert reply.outputs["probabilities"].shape == (1, 10)  # the request itself is served
        assert runtime.l1.keys() == [y.key]
        assert {key for key, _ in runtime.batchers} == {y.key}  # nothing holds X's session any more
        assert all(runtime.l1.peek(key) is loaded for (key, _), (loaded, _) in runtime.batchers.items())
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()


async def test_a_cached_artifact_damaged_on_disk_is_pulled_again_when_it_fails_to_load(registry, push_digits, tmp_path):
    x = await push_digits("x")
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path), intra_op_threads=1,
                       measure_on_load=False)
    row = {"input": np.ones((1, 64), np.float32)}
    for damage in (lambda data: data[:40], lambda data: data[:-100] + bytes(100)):  # truncated, zeroed tail
        client = RegistryClient(registry, timeout=10)
        runtime = EdgeRuntime(settings, client, DiskCache(tmp_path))  # a runtime (re)started on the cache
        try:
            assert (await runtime.infer(oip.InferRequest(x.name, row))).outputs["probabilities"].shape == (1, 10)
        finally:
            await runtime.drain()
            runtime.close()
            await client.close()
        artifact = DiskCache(tmp_path).artifact_path(x.sha256)
        artifact.write_bytes(damage(artifact.read_bytes()))
    client = RegistryClient(registry, timeout=10)
    runtime = EdgeRuntime(settings, client, DiskCache(tmp_path))
    try:
        reply = await runtime.infer(oip.InferRequest(x.name, row))
        assert reply.outputs["probabilities"].shape == (1, 10)
        assert runtime.disk.intact(x.sha256)  # the damaged copy was replaced by the registry's
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()


async def test_without_the_registry_a_damaged_artifact_is_deleted_and_an_intact_unloadable_one_is_named(tmp_path):
    disk = DiskCache(tmp_path)
    other = b"other bytes, no model either"
    intact, damaged = _variant(), replace(_variant(), name="other", sha256=hashlib.sha256(other).hexdigest())
    disk.put(intact, ARTIFACT)  # hashes right, but is no ONNX model
    registry = RegistryClient("127.0.0.1:1", timeout=0.5)  # nothing listens there: UNAVAILABLE
    runtime = EdgeRuntime(replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path), intra_op_threads=1,
                                  measure_on_load=False), registry, disk)
    row = {"input": np.ones((1, 64), np.float32)}
    try:
        with pytest.raises(CneiError) as unloadable:
            await runtime.infer(oip.InferRequest("digits", row))
        assert unloadable.value.code is ErrorCode.INTERNAL
        assert (f"model 'digits' version 1 (FP32): ONNX Runtime cannot load its artifact sha256:{intact.sha256}, "
                f"whose bytes are as the registry published them") in unloadable.value.message
        assert disk.intact(intact.sha256)  # intact bytes are kept
        disk.put(damaged, other)
        disk.artifact_path(damaged.sha256).write_bytes(other[:5])
        runtime.forget_resolutions()
        with pytest.raises(CneiError) as gone:
            await runtime.load(damaged)
        assert gone.value.code is ErrorCode.UNAVAILABLE
        assert "the cached artifact of model 'other' version 1 was corrupt and was deleted; pulling it again " \
               "failed" in gone.value.message
        assert not disk.artifact_path(damaged.sha256).exists()
    finally:
        runtime.close()
        await registry.close()


async def test_models_whose_name_and_version_join_alike_both_serve_offline_from_the_disk_cache(registry, digits_models,
                                                                                                 tmp_path):
    uid = uuid.uuid4().hex[:8]
    by_precision = {b.precision: b for b in digits_models}
    client = RegistryClient(registry, timeout=30)
    try:  # "<uid>--b" version 1 and "<uid>" version "b--1": a file name "<uid>--b--1--FP32.json" each
        dashed_name = await client.push_file(by_precision["FP32"].path, f"{uid}--b", "1", "FP32")
        dashed_version = await client.push_file(by_precision["INT8"].path, uid, "b--1", "FP32")
    finally:
        await client.close()
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path), intra_op_threads=1,
                       measure_on_load=False)
    row = {"input": np.ones((1, 64), np.float32)}
    for registry_address in (registry, "127.0.0.1:1"):  # online (pulled), then cut off (nothing listens there)
        client = RegistryClient(registry_address, timeout=2)
        runtime = EdgeRuntime(settings, client, DiskCache(tmp_path))
        try:
            for variant in (dashed_name, dashed_version):
                reply = await runtime.infer(oip.InferRequest(variant.name, row, model_version=variant.version))
                assert (reply.model_name, reply.model_version) == (variant.name, variant.version)
        finally:
            await runtime.drain()
            runtime.close()
            await client.close()


def _runtime(client: RegistryClient, cache: Path) -> EdgeRuntime:
    """A runtime of the registry `client`, caching in `cache`: one intra-op thread, nothing measured at load."""
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(cache), intra_op_threads=1,
                       measure_on_load=False)
    return EdgeRuntime(settings, client, DiskCache(cache))


async def test_a_resync_refreshes_the_deployed_versions_not_the_newest(registry, tmp_path):
    v1_file, v2_file = write_versions(tmp_path)
    name = f"pinned-{uuid.uuid4().hex[:8]}"
    client = RegistryClient(registry, timeout=30)
    runtime = _runtime(client, tmp_path / "cache")
    try:
        v1 = await client.push_file(v1_file, name, "1", "FP32")
        await client.put_deployment(DeploymentSpec(model=name, rollout=RolloutSpec(stable="1")))
        await runtime.load(v1)
        v2 = await client.push_file(v2_file, name, "2", "FP32")  # pushed while this node was cut off
        await runtime.resync()  # back online
        assert runtime.l1.keys() == [v1.key] and not runtime.disk.has(v2)
        await client.put_deployment(DeploymentSpec(model=name, rollout=RolloutSpec("1", "2", 10.0)))
        await runtime.resync()
        assert runtime.l1.keys() == [v1.key] and runtime.disk.has(v2)  # the canary is pulled, loaded on demand
        await client.put_deployment(DeploymentSpec(model=name, rollout=RolloutSpec(stable="2")))
        await runtime.resync()
        assert runtime.l1.keys() == [v1.key, v2.key]  # the promoted version is loaded where v1 is
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()


async def test_the_disk_cache_keeps_the_version_a_deployment_pins_and_it_serves_offline(registry, tmp_path):
    name = f"pinned-{uuid.uuid4().hex[:8]}"
    client = RegistryClient(registry, timeout=30)
    versions = [await client.push_file(write_mlp(tmp_path, seed), name, str(seed), "FP32") for seed in (1, 2, 3, 4)]
    await client.put_deployment(DeploymentSpec(model=name, rollout=RolloutSpec(stable="1")))
    size, cache = versions[0].size_bytes, tmp_path / "cache"
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(cache), intra_op_threads=1, inline_max_us=0.0,
                       measure_on_load=False, cache_max_bytes=size + 1000,  # one model in memory
                       disk_cache_max_bytes=size * 7 // 2)  # three artifacts on disk
    row = {"input": np.ones((1, 64), np.float32)}
    runtime = EdgeRuntime(settings, client, DiskCache(cache, settings.disk_cache_max_bytes))
    try:
        for variant in versions:  # v1 (pinned) leaves memory first: the least recently used, yet it stays
            await runtime.infer(oip.InferRequest(name, row, model_version=variant.version))
        assert sorted(v.version for v in runtime.disk.variants()) == ["1", "3", "4"]
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()
    client = RegistryClient("127.0.0.1:1", timeout=2)  # cut off: a coordinator's request names the pinned version
    runtime = EdgeRuntime(settings, client, DiskCache(cache, settings.disk_cache_max_bytes))
    try:
        assert (await runtime.infer(oip.InferRequest(name, row, model_version="1"))).model_version == "1"
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()


async def test_a_restarted_runtime_making_room_keeps_the_version_a_deployment_pins(registry, tmp_path):
    """A runtime started afresh (no resync yet: it knows no deployment) pulling another model
    reads the deployments of the models on its disk before making room: the pinned version stays
    though it is the least recently used, and an unpinned older one goes."""
    name, other = f"pinned-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    client = RegistryClient(registry, timeout=30)
    versions = [await client.push_file(write_mlp(tmp_path, seed), name, str(seed), "FP32") for seed in (1, 3, 4)]
    another = await client.push_file(write_mlp(tmp_path, 7), other, "1", "FP32")
    await client.put_deployment(DeploymentSpec(model=name, rollout=RolloutSpec(stable="1")))
    size, cache = versions[0].size_bytes, tmp_path / "cache"
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(cache), intra_op_threads=1, inline_max_us=0.0,
                       measure_on_load=False, measure_siblings=False, disk_cache_max_bytes=size * 7 // 2)  # three
    row = {"input": np.ones((1, 64), np.float32)}
    for asked in ([(name, v.version) for v in versions], [(other, another.version)]):  # then a fresh process
        runtime = EdgeRuntime(settings, client, DiskCache(cache, settings.disk_cache_max_bytes))
        try:
            for model, version in asked:
                await runtime.infer(oip.InferRequest(model, row, model_version=version))
        finally:
            await runtime.drain()
            runtime.close()
    await client.close()
    kept = sorted((v.name, v.version) for v in DiskCache(cache, settings.disk_cache_max_bytes).variants())
    assert kept == sorted([(name, "1"), (name, "4"), (other, "1")])  # the pinned and the newest stay


async def test_a_request_after_a_resync_reads_not_again_the_deployment_the_resync_read(tmp_path):
    name = f"pinned-{uuid.uuid4().hex[:8]}"
    async with counted_registry(tmp_path / "registry") as (address, calls):
        client = RegistryClient(address, timeout=10)
        settings = replace(cfg.load(RuntimeSettings, PREFIX), intra_op_threads=1, measure_on_load=False)
        runtime = EdgeRuntime(settings, client, DiskCache(tmp_path / "cache"))
        try:
            v1, _ = [await client.push_file(write_mlp(tmp_path, seed), name, str(seed), "FP32") for seed in (1, 2)]
            await client.put_deployment(DeploymentSpec(model=name, batching=BatchingSpec(max_batch_size=4),
                                                       rollout=RolloutSpec(stable="1")))
            await runtime.load(v1)
            await runtime.resync()
            calls.clear()
            assert (await runtime.resolve(name)).version == "1" and await runtime.deployment_cap(name) == 4
            assert (calls["GetDeployment"], calls["ListModels"]) == (0, 0)
        finally:
            await runtime.drain()
            runtime.close()
            await client.close()


async def test_a_resync_whose_deployment_read_times_out_is_tried_again(tmp_path):
    """A registry too slow to answer within the client's deadline is as unreachable as one that
    refuses the connection: the resync is tried again, and pulls and loads the version deployed."""
    name = f"pinned-{uuid.uuid4().hex[:8]}"
    stalls = Counter()
    async with counted_registry(tmp_path / "registry", stalls, stall_s=1.0) as (address, calls):
        client = RegistryClient(address, timeout=0.5)
        settings = replace(cfg.load(RuntimeSettings, PREFIX), intra_op_threads=1, measure_on_load=False)
        runtime = EdgeRuntime(settings, client, DiskCache(tmp_path / "cache"))
        try:
            v1, v2 = [await client.push_file(write_mlp(tmp_path, seed), name, str(seed), "FP32") for seed in (1, 2)]
            await client.put_deployment(DeploymentSpec(model=name, rollout=RolloutSpec(stable="1")))
            await runtime.load(v1)
            await client.put_deployment(DeploymentSpec(model=name, rollout=RolloutSpec(stable="2")))
            stalls["GetDeployment"] = 1  # the resync's read of the deployment outlives its deadline
            await runtime.resync()
            assert calls["GetDeployment"] == 1 and not runtime.disk.has(v2)
            for _ in range(100):  # tried again after a second
                if v2.key in runtime.l1.keys():
                    break
                await asyncio.sleep(0.05)
            assert runtime.disk.has(v2) and v2.key in runtime.l1.keys()
        finally:
            await runtime.drain()
            runtime.close()
            await client.close()


class _CountingRegistry(RegistryClient):
    """A real registry client that counts its reads of deployments (one or all)."""

    deployment_reads = 0

    async def get_deployment(self, model: str) -> DeploymentSpec:
        self.deployment_reads += 1
        return await super().get_deployment(model)

    async def list_deployments(self) -> list[DeploymentSpec]:
        self.deployment_reads += 1
        return await super().list_deployments()


@pytest.mark.parametrize(("disk_cache_max_bytes", "reads"), [(0, 0), (1 << 30, 1)],
                         ids=["no-limit-reads-none", "a-budget-reads-them-once"])
async def test_a_restarted_runtime_reads_the_deployments_of_the_models_on_its_disk_before_a_pull_only_to_make_room(
        registry, tmp_path, disk_cache_max_bytes, reads):
    """The deployments (all of them, listed at once) say which versions making room must keep: a
    disk cache without a byte limit never makes room, so a pull reads none of them."""
    client = _CountingRegistry(registry, timeout=30)
    on_disk = await client.push_file(write_mlp(tmp_path, 1), f"on-disk-{uuid.uuid4().hex[:8]}", "1", "FP32")
    pulled = await client.push_file(write_mlp(tmp_path, 7), f"pulled-{uuid.uuid4().hex[:8]}", "1", "FP32")
    cache = tmp_path / "cache"
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(cache), intra_op_threads=1,
                       measure_on_load=False, measure_siblings=False, disk_cache_max_bytes=disk_cache_max_bytes)
    for variant in (on_disk, pulled):  # each by a fresh process: the second knows no deployment yet
        runtime = EdgeRuntime(settings, client, DiskCache(cache, settings.disk_cache_max_bytes))
        try:
            await runtime.load(variant)
        finally:
            await runtime.drain()
            runtime.close()
    await client.close()
    assert client.deployment_reads == reads


async def test_a_registry_that_stops_answering_costs_a_request_naming_no_version_one_timeout(tmp_path):
    """A registry that hangs (a real gRPC server answering nothing within the client's timeout):
    the deployment lookup a versionless request makes first times out, and resolution then goes
    straight to the disk cache, for every model, instead of waiting out a second call."""
    import grpc

    async def hang(request, context):
        await asyncio.sleep(30)

    handlers = {m: grpc.unary_unary_rpc_method_handler(hang, request_deserializer=lambda b: b,
                                                       response_serializer=lambda b: b)
                for m in ("GetDeployment", "ResolveModel", "ListModels")}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("cnei.registry.v1.ModelRegistry", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    disk = DiskCache(tmp_path)
    disk.put(_variant(), ARTIFACT)
    registry = RegistryClient(f"127.0.0.1:{port}", timeout=1.0)
    runtime = EdgeRuntime(replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path)), registry, disk)
    try:
        began = asyncio.get_running_loop().time()
        assert (await runtime.resolve("digits")).version == "1"  # from the disk cache
        assert asyncio.get_running_loop().time() - began < 1.8  # one timeout (1 s), not two
    finally:
        runtime.close()
        await registry.close()
        await server.stop(0)


async def test_a_resync_meeting_a_new_version_not_yet_published_in_a_cached_precision_logs_it_at_info(
        registry, tmp_path, caplog):
    """A new version's FP32 is published before its FP16: a resync then finds the version served
    lacking the FP16 this node caches, which is expected (pulled when it is published), not a warning."""
    v1_file, v2_file = write_versions(tmp_path)
    name = f"publishing-{uuid.uuid4().hex[:8]}"
    client = RegistryClient(registry, timeout=30)
    runtime = _runtime(client, tmp_path / "cache")
    try:
        await runtime.load(await client.push_file(v1_file, name, "1", "FP16"))
        await client.put_deployment(DeploymentSpec(model=name))  # stable: the latest version
        await client.push_file(v2_file, name, "2", "FP32")  # its FP16 still to come
        with caplog.at_level(logging.INFO, logger="services.edge_runtime"):
            await runtime.resync()
        resync = [r for r in caplog.records if r.name.startswith("services.edge_runtime") and name in r.getMessage()]
        assert not [r.getMessage() for r in resync if r.levelno >= logging.WARNING]
        assert any(r.levelno == logging.INFO and "v2 FP16" in r.getMessage() for r in resync)
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()


async def test_a_resync_the_registry_does_not_answer_still_logs_a_warning(tmp_path, caplog):
    disk = DiskCache(tmp_path)
    disk.put(_variant(), ARTIFACT)
    client = RegistryClient("127.0.0.1:1", timeout=0.5)  # nothing listens there: UNAVAILABLE
    runtime = EdgeRuntime(replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path)), client, disk)
    try:
        with caplog.at_level(logging.INFO, logger="services.edge_runtime"):
            await runtime.resync(attempt=99)  # no retry scheduled
        assert any(r.levelno == logging.WARNING and "resync of digits" in r.getMessage() for r in caplog.records)
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()
