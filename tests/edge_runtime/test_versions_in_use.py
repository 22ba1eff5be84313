"""A runtime core over a real registry, its disk cache under a tight byte budget: making room keeps
every version requests go to (`served.versions_in_use` over every deployment the registry lists),
the one an ensemble step or a joint deployment runs too, though neither its model's own deployment
serves it nor is it the newest of its model on disk; and it serves offline afterwards."""
from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from services.common import oip
from services.common import settings as cfg
from services.common.deployment import DeploymentSpec, EnsembleStep, JointSpec, PrecisionSpec
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings
from tests.edge_runtime.counting import CountingDiskCache
from tests.edge_runtime.processes import write_mlp

ROW = {"input": np.ones((1, 64), np.float32)}
MODEL_VARIANTS = ("1:FP32", "1:INT8", "2:FP32", "3:INT8")  # version 3 is INT8 alone: not yet released in FP32


def int8_step(model: str, version: str = "") -> EnsembleStep:
    return EnsembleStep(model=model, version=version, inputs=("input=input",), outputs=("probabilities=p",),
                        precision="INT8")


def named_step(model: str, edge: str) -> list[DeploymentSpec]:
    return [DeploymentSpec(f"{model}-pipe", ensemble=(int8_step(model, "1"),))]


def newest_with_int8_and_fp32(model: str, edge: str) -> list[DeploymentSpec]:
    """The model's deployment needs FP32: the step runs version 1, the newest with INT8 and FP32."""
    return [DeploymentSpec(model, precision=PrecisionSpec("FP32")),
            DeploymentSpec(f"{model}-pipe", ensemble=(int8_step(model),))]


def joint_cloud_model(model: str, edge: str) -> list[DeploymentSpec]:
    return [DeploymentSpec(edge, joint=JointSpec(mode="sync", cloud_model=model, cloud_version="1",
                                                 cloud_precision="INT8"))]


def step_request(model: str) -> oip.InferRequest:
    """What a coordinator sends a runtime for the step (it names the version it resolved)."""
    return oip.InferRequest(model, ROW, model_version="1", parameters={"precision": "INT8"})


@pytest.mark.parametrize("deployments", [named_step, newest_with_int8_and_fp32, joint_cloud_model],
                         ids=["an-ensemble-step-naming-an-older-version",
                              "an-ensemble-step-running-the-newest-version-with-its-precision-and-the-deployments",
                              "a-joint-deployments-cloud-model"])
async def test_pulling_other_models_under_a_tight_disk_budget_never_evicts_the_version_another_deployment_runs(
        registry, tmp_path, deployments: Callable[[str, str], list[DeploymentSpec]]):
    name, other, edge = (f"{prefix}-{uuid.uuid4().hex[:8]}" for prefix in ("in-use", "other", "edge"))
    client = RegistryClient(registry, timeout=30)
    pushed = {}
    for seed, key in enumerate(MODEL_VARIANTS, start=1):
        version, precision = key.split(":")
        pushed[key] = await client.push_file(write_mlp(tmp_path, seed), name, version, precision)
    others = [await client.push_file(write_mlp(tmp_path, 10 + v), other, str(v), "FP32") for v in (1, 2, 3, 4)]
    await client.push_file(write_mlp(tmp_path, 20), edge, "1", "FP32")
    for spec in deployments(name, edge):
        await client.put_deployment(spec)
    size, cache, in_use = pushed["1:INT8"].size_bytes, tmp_path / "cache", pushed["1:INT8"]
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(cache), intra_op_threads=1, inline_max_us=0.0,
                       measure_on_load=False, measure_siblings=False, cache_max_bytes=size + 1000,  # one in memory
                       disk_cache_max_bytes=size * 9 // 2)  # four artifacts on disk
    runtime = EdgeRuntime(settings, client, DiskCache(cache, settings.disk_cache_max_bytes))
    try:
        for variant in others[:2]:  # the versions in use are first read with these alone on disk
            await runtime.infer(oip.InferRequest(other, ROW, model_version=variant.version))
        assert (await runtime.infer(step_request(name))).model_version == "1"
        await runtime.infer(oip.InferRequest(name, ROW, model_version="3", parameters={"precision": "INT8"}))
        for variant in others:  # asked again: version 1 INT8 is the least recently used; then each pull makes room
            await runtime.infer(oip.InferRequest(other, ROW, model_version=variant.version))
            assert runtime.disk.has(in_use), f"{in_use.key} evicted to make room for {variant.key}"
        assert sorted(v.key for v in runtime.disk.variants()) == sorted(
            [in_use.key, pushed["3:INT8"].key, others[2].key, others[3].key])  # room was made: versions 1, 2 left
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()

    offline = RegistryClient("127.0.0.1:1", timeout=2)  # the registry out of reach
    runtime = EdgeRuntime(settings, offline, DiskCache(cache, settings.disk_cache_max_bytes))
    try:
        answer = await runtime.infer(step_request(name))
        assert (answer.model_version, answer.parameters["cnei_precision"]) == ("1", "INT8")
    finally:
        await runtime.drain()
        runtime.close()
        await offline.close()


async def test_a_pull_under_a_disk_budget_reads_the_cached_manifests_once_making_room_too(registry, tmp_path):
    name, client = f"reads-{uuid.uuid4().hex[:8]}", RegistryClient(registry, timeout=30)
    pushed = [await client.push_file(write_mlp(tmp_path, 30 + v), name, str(v), "FP32") for v in (1, 2, 3)]
    settings = replace(cfg.load(RuntimeSettings, PREFIX), intra_op_threads=1, measure_on_load=False,
                       measure_siblings=False, disk_cache_max_bytes=pushed[0].size_bytes * 5 // 2)  # two fit
    runtime = EdgeRuntime(settings, client, CountingDiskCache(tmp_path / "cache", settings.disk_cache_max_bytes))
    try:
        for variant in pushed:  # the third pull evicts version 1
            runtime.disk.manifest_reads = 0
            await runtime.load(variant)
            runtime.unload(variant.key)
            assert runtime.disk.manifest_reads == 1, f"pulling {variant.key}"
        assert sorted(v.version for v in runtime.disk.variants()) == ["2", "3"]
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()
