"""A deployment's checks read its model's variants from the store once, however many of them use
them (a real gRPC registry server over a store that counts its reads)."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from services.common.deployment import DeploymentSpec, JointSpec, PrecisionSpec, RolloutSpec
from services.common.registry_client import RegistryClient
from services.models.onnx_mlp import mlp_graph
from services.registry.core import Registry
from services.registry.store import RegistryStore
from tests.registry.conftest import serving


class CountingStore(RegistryStore):
    """Counts the reads of each model's variants."""

    def __init__(self, data_dir):
        super().__init__(data_dir)
        self.reads: collections.Counter = collections.Counter()

    def variants(self, name: str = ""):
        self.reads[name] += 1
        return super().variants(name)


@pytest.mark.parametrize("spec", [
    DeploymentSpec("m", precision=PrecisionSpec("INT8"), rollout=RolloutSpec("1", "2", 10.0)),
    DeploymentSpec("m", joint=JointSpec(mode="sync", cloud_version="2")),
], ids=["pinned-and-canary", "joint-with-itself-in-the-cloud"])
async def test_a_deployment_put_reads_its_models_variants_once(tmp_path, spec):
    store = CountingStore(tmp_path / "data")
    artifact = tmp_path / "m.onnx"
    onnx.save(mlp_graph([np.ones((4, 3), np.float32)], [np.zeros(3, np.float32)], name="m"), artifact)
    async with serving(Registry(store)) as address:
        client = RegistryClient(address)
        try:
            for version in ("1", "2"):
                for precision in ("FP32", "INT8"):
                    await client.push_file(artifact, "m", version, precision)
            store.reads.clear()
            assert await client.put_deployment(spec) == spec
        finally:
            await client.close()
    store.close()
    assert store.reads["m"] == 1
