"""The coordinator's response cache on its serving path, over real gRPC (tests/coordinator/mesh.py):
hits in Triton's statistics, what decides whether an ensemble's kept answer still holds, and
that a request never gets an answer from a tier or variant it would not be served by."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.common.deployment import DeploymentSpec, EnsembleStep, PrecisionSpec, RolloutSpec
from services.common.model_spec import ModelVariant
from tests.coordinator.mesh import Catalog, NodeCore, VersionedCatalog, VersionedNode, mesh, variant

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


async def test_an_ensemble_answer_kept_at_a_steps_old_precision_is_not_served_after_it_changes():
    """A step without a precision of its own is served at its model's deployment's: when that
    changes, the ensemble's kept answers were computed at the old one."""
    specs = {"m": DeploymentSpec(model="m", precision=PrecisionSpec(precision="FP32")), "e": ensemble_of("m")}
    variants = [variant(), replace(variant(), precision="INT8")]
    async with mesh(variants, specs, {"n1": NodeCore()}) as m:
        first = (await m.infer("e", X))[1].parameters
        assert first["cnei_ensemble"] == "m@n1/FP32"
        assert (await m.infer("e", X))[1].parameters["cnei_response_cache"] is True
        specs["m"] = DeploymentSpec(model="m", precision=PrecisionSpec(precision="INT8"))
        after = (await m.infer("e", X))[1].parameters
        assert "cnei_response_cache" not in after
        assert after["cnei_ensemble"] == "m@n1/INT8"
        assert (await m.infer("e", X))[1].parameters["cnei_response_cache"] is True  # kept at INT8 now


async def test_an_ensemble_whose_step_has_a_canary_is_not_cached_and_no_canary_answer_outlives_a_rollback():
    """A step that names no version goes to the canary for its share of requests: a kept answer
    would be one version's for every request, and the canary's after it is rolled back."""
    specs = {"m": DeploymentSpec(model="m", rollout=RolloutSpec(stable="1", canary="2", canary_percent=100.0)),
             "e": ensemble_of("m")}
    variants = [variant(), replace(variant(), version="2")]
    node = VersionedNode()
    async with mesh(variants, specs, {"n1": node}) as m:
        m.core.catalog = VersionedCatalog(variants, specs)
        under_canary = [(await m.infer("e", X))[1] for _ in range(2)]
        for answer in under_canary:
            assert "cnei_response_cache" not in answer.parameters
            np.testing.assert_array_equal(answer.outputs["y"], X * 2)  # the canary's
        assert len(node.calls) == 2
        specs["m"] = DeploymentSpec(model="m", rollout=RolloutSpec(stable="1"))  # rolled back
        after = [(await m.infer("e", X))[1] for _ in range(2)]
        assert ["cnei_response_cache" in a.parameters for a in after] == [False, True]
        for answer in after:
            np.testing.assert_array_equal(answer.outputs["y"], X)  # the stable version's


async def test_a_request_for_one_tier_never_gets_an_answer_another_tier_computed():
    async with mesh([variant()], {"m": DeploymentSpec(model="m", response_cache=True)},
                    {"e1": NodeCore(), "c1": NodeCore()}, tiers={"c1": "cloud"}) as m:
        assert (await m.infer("m", X, {"tier": "cloud"}))[1].parameters["cnei_tier"] == "cloud"
        edge = (await m.infer("m", X, {"tier": "edge"}))[1].parameters
        assert edge["cnei_tier"] == "edge" and "cnei_response_cache" not in edge
        again = (await m.infer("m", X, {"tier": "edge"}))[1].parameters
        assert (again["cnei_tier"], again["cnei_response_cache"]) == ("edge", True)


def timed(precision: str, accuracy: str, latency_ms: str) -> ModelVariant:
    return replace(variant(accuracy=accuracy, **{"latency_ms.edge": latency_ms}), precision=precision)


async def test_an_answer_kept_at_the_variant_a_latency_budget_chose_goes_once_new_measurements_choose_another():
    """Within 5 ms the most accurate variant serves: FP32 while it measures 4 ms, INT8 once it
    measures 10 ms. The FP32 answer kept before is not what the budget now chooses."""
    specs = {"m": DeploymentSpec(model="m", response_cache=True, precision=PrecisionSpec(latency_budget_ms=5.0))}
    async with mesh([timed("FP32", "0.98", "4"), timed("INT8", "0.9", "1")], specs, {"e1": NodeCore()}) as m:
        assert (await m.infer("m", X))[1].parameters["cnei_precision"] == "FP32"
        m.core.catalog = Catalog([timed("FP32", "0.98", "10"), timed("INT8", "0.9", "1")], specs)
        after = (await m.infer("m", X))[1].parameters
        assert after["cnei_precision"] == "INT8" and "cnei_response_cache" not in after
        assert (await m.infer("m", X))[1].parameters["cnei_response_cache"] is True
