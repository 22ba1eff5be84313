"""A federated job's checkpoint: weights and FedAvgM velocity survive the round trip exactly."""
from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.trainer import checkpoint


def _named(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.normal(size=(64, 32)).astype(np.float32),
            "fc1.bias": rng.normal(size=(32,)).astype(np.float32)}


def test_weights_and_velocity_come_back_bit_for_bit():
    weights, velocity = _named(1), _named(2)
    got_weights, got_velocity = checkpoint.decode(checkpoint.encode(weights, velocity))
    assert set(got_weights) == set(weights) and set(got_velocity) == set(velocity)
    for name in weights:
        np.testing.assert_array_equal(got_weights[name], weights[name])
        np.testing.assert_array_equal(got_velocity[name], velocity[name])
        assert got_weights[name].dtype == np.float32


def test_a_strategy_without_velocity_gets_none_back():
    weights, velocity = checkpoint.decode(checkpoint.encode(_named(3)))
    assert velocity is None and set(weights) == {"fc1.weight", "fc1.bias"}


@pytest.mark.parametrize("data", [b"", b"not an npz archive", checkpoint.encode({}, _named(4))],
                         ids=["empty", "garbage", "velocity-only"])
def test_unusable_bytes_are_a_clear_invalid_argument(data):
    with pytest.raises(InvalidArgument, match="checkpoint"):
        checkpoint.decode(data)
