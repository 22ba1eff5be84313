"""`cnei deploy canary|promote|rollback`: what each makes of a model's rollout."""
from __future__ import annotations

import pytest

from services.cli.deploy import rollout_change
from services.common.deployment import DeploymentSpec, PrecisionSpec, RolloutSpec
from services.common.errors import FailedPrecondition
from services.common.model_spec import ModelVariant


def deployed(rollout: RolloutSpec = RolloutSpec(), precision: str = "") -> DeploymentSpec:
    return DeploymentSpec(model="m", rollout=rollout, precision=PrecisionSpec(precision))


def held(*versions: str, precision: str = "FP32") -> list[ModelVariant]:
    return [ModelVariant("m", version, precision, "0", 1, [], []) for version in versions]


def test_a_canary_is_set_promoted_to_stable_or_rolled_back():
    canary = rollout_change(deployed(RolloutSpec(stable="1")), "canary", "2", 25.0)
    assert canary == RolloutSpec("1", "2", 25.0)
    assert rollout_change(deployed(canary), "promote") == RolloutSpec("2", "", 0.0)
    assert rollout_change(deployed(canary), "rollback") == RolloutSpec("1", "", 0.0)


@pytest.mark.parametrize("verb", ["promote", "rollback"])
def test_without_a_canary_promote_and_rollback_say_so(verb):
    with pytest.raises(FailedPrecondition, match=f"no canary to {verb}"):
        rollout_change(deployed(RolloutSpec(stable="3")), verb)


@pytest.mark.parametrize(("versions", "stable"), [(["1", "2"], "1"), (["1", "2", "10", "3"], "10"),
                                                  (["1", "2", "3"], "3")],
                         ids=["canary-of-the-latest", "numeric-order", "canary-older-than-the-latest"])
def test_a_canary_over_no_pinned_stable_version_pins_the_newest_other_one(versions, stable):
    canary = rollout_change(deployed(), "canary", "2", 10.0, held(*versions))
    assert canary == RolloutSpec(stable, "2", 10.0)
    assert rollout_change(deployed(canary), "rollback") == RolloutSpec(stable, "", 0.0)


def test_a_canary_over_no_pinned_stable_version_pins_the_newest_other_one_with_the_deployments_precision():
    variants = held("1", "2", "3") + held("1", precision="INT8")
    assert rollout_change(deployed(precision="INT8"), "canary", "2", 10.0, variants) == RolloutSpec("1", "2", 10.0)


@pytest.mark.parametrize(("variants", "precision"), [(held("1", "1"), ""), (held("1", "2"), "INT8")],
                         ids=["only-version", "no-other-with-the-precision"])
def test_a_canary_with_no_other_version_to_serve_has_no_stable_one_to_keep(variants, precision):
    with pytest.raises(FailedPrecondition, match="version 1 is the model's only version"):
        rollout_change(deployed(precision=precision), "canary", "1", 10.0, variants)
