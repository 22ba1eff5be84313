"""The runtime core on its own (no gRPC server): how it resolves models."""
from __future__ import annotations

import hashlib
from dataclasses import replace

from services.common import settings as cfg
from services.common.model_spec import ModelVariant, TensorSpec
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings

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
