"""`cnei deploy canary|promote|rollback`: what each makes of a model's rollout."""
from __future__ import annotations

import pytest

from services.cli.main import rollout_change
from services.common.deployment import RolloutSpec
from services.common.errors import FailedPrecondition


def test_a_canary_is_set_promoted_to_stable_or_rolled_back():
    canary = rollout_change(RolloutSpec(stable="1"), "canary", "2", 25.0)
    assert canary == RolloutSpec("1", "2", 25.0)
    assert rollout_change(canary, "promote") == RolloutSpec("2", "", 0.0)
    assert rollout_change(canary, "rollback") == RolloutSpec("1", "", 0.0)


@pytest.mark.parametrize("verb", ["promote", "rollback"])
def test_without_a_canary_promote_and_rollback_say_so(verb):
    with pytest.raises(FailedPrecondition, match=f"no canary to {verb}"):
        rollout_change(RolloutSpec(stable="3"), verb)


@pytest.mark.parametrize(("versions", "stable"), [(["1", "2"], "1"), (["1", "2", "10", "3"], "10"),
                                                  (["1", "2", "3"], "3")],
                         ids=["canary-of-the-latest", "numeric-order", "canary-older-than-the-latest"])
def test_a_canary_over_no_pinned_stable_version_pins_the_newest_other_one(versions, stable):
    canary = rollout_change(RolloutSpec(), "canary", "2", 10.0, versions)
    assert canary == RolloutSpec(stable, "2", 10.0)
    assert rollout_change(canary, "rollback") == RolloutSpec(stable, "", 0.0)


def test_a_canary_of_a_model_s_only_version_has_no_stable_one_to_keep():
    with pytest.raises(FailedPrecondition, match="version 1 is the model's only version"):
        rollout_change(RolloutSpec(), "canary", "1", 10.0, ["1", "1"])
