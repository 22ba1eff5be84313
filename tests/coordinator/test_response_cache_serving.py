"""The coordinator's response cache on its serving path, over real gRPC (tests/coordinator/mesh.py):
hits in Triton's statistics."""
from __future__ import annotations

import numpy as np
import pytest

from services.common.deployment import DeploymentSpec, EnsembleStep
from tests.coordinator.mesh import NodeCore, mesh, variant

X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)


def ensemble_of(step_model: str, name: str = "e") -> DeploymentSpec:
    return DeploymentSpec(model=name, response_cache=True,
                          ensemble=(EnsembleStep(model=step_model, inputs=("x=x",), outputs=("y=y",)),))


@pytest.mark.parametrize("model", ["m", "e"], ids=["model", "ensemble"])
async def test_cache_hits_are_successes_that_add_no_inferences(model):
    """Triton's statistics extension: inference_count and execution_count do not include cache
    hits; success, queue and cache_hit do."""
    specs = {"m": DeploymentSpec(model="m", response_cache=True), "e": ensemble_of("m")}
    node = NodeCore()
    async with mesh([variant()], specs, {"n1": node}) as m:
        answers = [await m.infer(model, X) for _ in range(3)]
        assert [a[0] for a in answers] == ["OK"] * 3
        assert ["cnei_response_cache" in a[1].parameters for a in answers] == [False, True, True]
        assert len(node.calls) == 1
        version = "1"  # a model's and an ensemble's alike
        stats = m.core.statistics(model, version)[0]
        assert (stats.success.count, stats.queue.count, stats.cache_hit.count, stats.cache_miss.count) == (3, 3, 2, 1)
        assert stats.inference_count == 2  # the two rows of the one request that ran
        step = m.core.statistics("m", "1")[0]
        assert (step.inference_count, step.execution_count) == (2, 1)
