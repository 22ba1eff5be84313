"""A runtime's preload at start: a model not registered yet is no warning; real failures are."""
from __future__ import annotations

import logging
import uuid
from dataclasses import replace

from services.common import settings as cfg
from services.common.registry_client import RegistryClient
from services.edge_runtime.__main__ import _preload
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings


async def _preload_logs(registry: str, tmp_path, caplog, spec: str) -> list[logging.LogRecord]:
    client = RegistryClient(registry, timeout=0.5)
    runtime = EdgeRuntime(replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path)), client,
                          DiskCache(tmp_path))
    try:
        with caplog.at_level(logging.INFO, logger="services.edge_runtime"):
            await _preload(runtime, (spec,))
    finally:
        await runtime.drain()
        runtime.close()
        await client.close()
    return [r for r in caplog.records if spec in r.getMessage()]


async def test_a_model_not_registered_yet_is_logged_at_info_as_loaded_once_pushed(registry, tmp_path, caplog):
    records = await _preload_logs(registry, tmp_path, caplog, f"digits-{uuid.uuid4().hex[:8]}")
    assert [r.levelno for r in records] == [logging.INFO]
    assert "pushed" in records[0].getMessage()


async def test_a_preload_the_registry_does_not_answer_is_a_warning(tmp_path, caplog):
    records = await _preload_logs("127.0.0.1:1", tmp_path, caplog, "digits")  # nothing listens there
    assert logging.WARNING in [r.levelno for r in records]
