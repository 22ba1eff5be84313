"""Sibling measurement: which precisions of a loaded version are measured, on what thread, and how
the runtime measures them against a real registry process without loading them."""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import replace

import pytest

from services.common import settings as cfg
from services.common.model_spec import ModelVariant
from services.common.registry_client import RegistryClient
from services.edge_runtime import siblings
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings
from services.edge_runtime.siblings import SiblingMeasurer, lower_priority, unmeasured_siblings
from tests.edge_runtime.processes import push_all_precisions

CLASS = "edge-small"


def _variant(precision: str, version: str = "1", **metadata: str) -> ModelVariant:
    return ModelVariant("m", version, precision, f"{precision}{version}", 10, [], [], metadata=dict(metadata))


@pytest.mark.parametrize("variants, expected", [
    ([_variant("FP32"), _variant("INT8"), _variant("FP16")], ["FP16", "INT8"]),
    ([_variant("FP32"), _variant("FP16", **{f"latency_ms.{CLASS}": "0.1"}), _variant("INT8")], ["INT8"]),
    ([_variant("FP32"), _variant("INT8", **{"latency_ms.cloud": "0.1"})], ["INT8"]),
    ([_variant("FP32"), _variant("INT8", "2"), _variant("FP16", "0")], []),
    ([_variant("FP32")], []),
], ids=["both, default order", "one measured on the class", "measured on another class only",
        "other versions", "no sibling"])
def test_the_siblings_measured_are_the_versions_other_precisions_unmeasured_on_the_class(variants, expected):
    assert [v.precision for v in unmeasured_siblings(variants, _variant("FP32"), CLASS)] == expected


def test_the_measuring_thread_runs_at_the_lowest_priority():
    seen = {}

    def measuring_thread():
        lower_priority()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=measuring_thread)
    thread.start()
    thread.join()
    assert seen["nice"] == siblings.LOWEST_PRIORITY
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < siblings.LOWEST_PRIORITY  # not this one


@pytest.fixture
async def digits_name(registry, digits_models):
    """The digits model pushed in FP32, FP16 and INT8 as version 1 of a fresh name."""
    return await push_all_precisions(registry, digits_models, "sib")


@pytest.fixture
async def runtime(registry, tmp_path):
    client = RegistryClient(registry, timeout=10)
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path), intra_op_threads=1,
                       node_class=CLASS)
    made = []

    def make(**changes) -> EdgeRuntime:
        made.append(EdgeRuntime(replace(settings, **changes), client, DiskCache(tmp_path)))
        return made[-1]
    yield make
    for runtime in made:
        await runtime.drain()
        runtime.close()
    await client.close()


async def _measured(registry: str, name: str) -> dict[str, ModelVariant]:
    client = RegistryClient(registry, timeout=10)
    try:
        return {v.precision: v for v in await client.list(name) if f"latency_ms.{CLASS}" in v.metadata}
    finally:
        await client.close()


async def test_loading_fp32_measures_fp16_and_int8_on_the_disk_cache_and_leaves_them_out_of_memory(
        registry, digits_name, runtime):
    edge = runtime()
    await edge.load(await edge.resolve(digits_name))
    await edge.siblings.idle()
    await edge.background.wait()  # FP32's own report
    measured = await _measured(registry, digits_name)
    assert set(measured) == {"FP32", "FP16", "INT8"}
    for variant in measured.values():
        assert float(variant.metadata[f"latency_ms.{CLASS}"]) > 0
        assert int(variant.metadata[f"memory_bytes.{CLASS}"]) >= variant.size_bytes
    assert edge.l1.keys() == [f"{digits_name}:1:FP32"]
    assert {v.precision for v in edge.disk.variants() if v.name == digits_name} == {"FP32", "FP16", "INT8"}


async def test_a_sibling_that_fails_to_measure_is_skipped_and_the_others_are_measured(
        registry, digits_name, runtime, monkeypatch, caplog):
    real = siblings.measure_artifact

    def refuse_fp16(path, variant, *args):
        if variant.precision == "FP16":
            raise RuntimeError("no FP16 kernels here")
        return real(path, variant, *args)
    monkeypatch.setattr(siblings, "measure_artifact", refuse_fp16)
    edge = runtime()
    await edge.load(await edge.resolve(digits_name))
    await edge.siblings.idle()
    await edge.background.wait()
    assert set(await _measured(registry, digits_name)) == {"FP32", "INT8"}
    assert f"could not measure {digits_name}:1:FP16, a sibling of {digits_name}:1:FP32: no FP16 kernels here" \
        in caplog.text


async def test_a_runtime_told_not_to_measure_siblings_measures_only_what_it_loads(registry, digits_name, runtime):
    edge = runtime(measure_siblings=False)
    await edge.load(await edge.resolve(digits_name, "", "INT8"))
    await edge.siblings.idle()
    await edge.background.wait()
    assert set(await _measured(registry, digits_name)) == {"INT8"}
    assert {v.precision for v in edge.disk.variants() if v.name == digits_name} == {"INT8"}


async def test_a_measurement_requests_came_during_is_made_again_when_the_node_is_quiet(
        registry, digits_name, digits_models, monkeypatch):
    monkeypatch.setattr(siblings, "IDLE_POLL_S", 0.01)
    activity, made, reported = [0, 0], [], []
    files = {b.precision: b.path for b in digits_models}

    def measure(path, variant, *args):
        made.append(variant.precision)
        if len(made) == 1:
            activity[1] += 1  # a request arrives while the first measurement runs
        return 1.0, 100

    async def report(variant, latency_ms, memory_bytes):
        reported.append((variant.precision, latency_ms, memory_bytes))

    @contextlib.asynccontextmanager
    async def artifact(variant):
        yield files[variant.precision]
    monkeypatch.setattr(siblings, "measure_artifact", measure)
    client = RegistryClient(registry, timeout=10)
    settings = replace(cfg.load(RuntimeSettings, PREFIX), node_class=CLASS)
    measurer = SiblingMeasurer(client, settings, artifact, report, lambda: tuple(activity), lambda key: False)
    try:
        fp16 = next(v for v in await client.list(digits_name) if v.precision == "FP16")
        measurer.schedule(fp16, 1)
        measurer.schedule(fp16, 1)  # already queued: measured once
        await measurer.idle()
    finally:
        await measurer.stop()
        measurer.close()
        await client.close()
    assert made == ["FP32", "FP32", "INT8"]
    assert reported == [("FP32", 1.0, 100), ("INT8", 1.0, 100)]
