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
