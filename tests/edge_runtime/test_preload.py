"""A runtime's preload at start: a model not registered yet is no warning (and loads once the
registry announces it, with no request); real failures are warnings."""
from __future__ import annotations

import logging
import uuid
from dataclasses import replace

from services.cli import infra
from services.common import settings as cfg
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.preload import Preload
from services.edge_runtime.settings import PREFIX, RuntimeSettings
from tests.edge_runtime.processes import call_registry, loaded, start_runtime


async def _preload_logs(registry: str, tmp_path, caplog, spec: str) -> list[logging.LogRecord]:
    client = RegistryClient(registry, timeout=0.5)
    runtime = EdgeRuntime(replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path)), client,
                          DiskCache(tmp_path))
    try:
        with caplog.at_level(logging.INFO, logger="services.edge_runtime"):
            await Preload(runtime, (spec,)).start()
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()
    return [r for r in caplog.records if spec in r.getMessage()]


async def test_a_model_not_registered_yet_is_logged_at_info_as_loading_once_pushed(registry, tmp_path, caplog):
    records = await _preload_logs(registry, tmp_path, caplog, f"digits-{uuid.uuid4().hex[:8]}")
    assert [r.levelno for r in records] == [logging.INFO]
    assert "pushed" in records[0].getMessage()


async def test_a_preload_the_registry_does_not_answer_is_a_warning(tmp_path, caplog):
    records = await _preload_logs("127.0.0.1:1", tmp_path, caplog, "digits")  # nothing listens there
    assert logging.WARNING in [r.levelno for r in records]


def test_a_model_named_for_preload_that_is_pushed_after_start_is_loaded_without_a_request(
        registry, nats_server, redis_server, digits_models, tmp_path):
    model = f"late-{uuid.uuid4().hex[:8]}"
    fp32 = next(v for v in digits_models if v.precision == "FP32")
    cache = tmp_path / "cache"
    proc, address = start_runtime(registry, nats_server, redis_server, cache, CNEI_RUNTIME_PRELOAD=model)
    try:
        assert loaded(address) == set()
        call_registry(registry, "push_file", fp32.path, model, "1", "FP32", fp32.metadata)
        infra.wait_until(lambda: f"{model}:1:FP32" in loaded(address), 20, "the model pushed after start loaded")
    finally:
        infra.stop(proc)
    log = (tmp_path / "cache.log").read_text()
    assert log.count(f"preloaded {model}") == 1, log


async def test_a_model_pushed_while_the_runtime_was_away_loads_on_the_resync_after_reconnect_and_only_once(
        registry, digits_models, tmp_path):
    model = f"away-{uuid.uuid4().hex[:8]}"
    fp32 = next(v for v in digits_models if v.precision == "FP32")
    client = RegistryClient(registry, timeout=30)
    runtime = EdgeRuntime(replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path),
                                  measure_on_load=False), client, DiskCache(tmp_path))
    preload = Preload(runtime, (model,))
    try:
        await preload.start()
        assert preload.pending == (model,)
        await client.push_file(fp32.path, model, "1", "FP32", fp32.metadata)  # its event never reaches the runtime
        runtime.forget_resolutions()  # as the resync after a reconnect does
        await preload.retry()
        assert preload.pending == () and [m.variant.name for m in runtime.loaded()] == [model]
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()
