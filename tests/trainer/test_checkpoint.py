"""A federated job's checkpoint: weights and the server optimiser's state survive the round trip exactly."""
from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.trainer import checkpoint


def _named(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.normal(size=(64, 32)).astype(np.float32),
            "fc1.bias": rng.normal(size=(32,)).astype(np.float32)}


def test_weights_and_every_state_slot_come_back_bit_for_bit():
    weights, state = _named(1), {"m": _named(2), "v": _named(5)}
    got_weights, got_state = checkpoint.decode(checkpoint.encode(weights, state))
    assert set(got_weights) == set(weights) and set(got_state) == {"m", "v"}
    for name in weights:
        np.testing.assert_array_equal(got_weights[name], weights[name])
        assert got_weights[name].dtype == np.float32
        for slot in ("m", "v"):
            np.testing.assert_array_equal(got_state[slot][name], state[slot][name])


def test_a_strategy_without_state_gets_none_back():
    weights, state = checkpoint.decode(checkpoint.encode(_named(3)))
    assert state == {} and set(weights) == {"fc1.weight", "fc1.bias"}


def test_a_checkpoint_written_before_state_slots_gives_its_velocity_back():
    import io
    weights, velocity = _named(6), _named(7)
    buffer = io.BytesIO()
    np.savez(buffer, **{f"w/{k}": v for k, v in weights.items()}, **{f"v/{k}": v for k, v in velocity.items()})
    _, state = checkpoint.decode(buffer.getvalue())
    assert set(state) == {"velocity"}
    np.testing.assert_array_equal(state["velocity"]["fc1.bias"], velocity["fc1.bias"])


@pytest.mark.parametrize("data", [b"", b"not an npz archive", checkpoint.encode({}, {"velocity": _named(4)})],
                         ids=["empty", "garbage", "state-only"])
def test_unusable_bytes_are_a_clear_invalid_argument(data):
    with pytest.raises(InvalidArgument, match="checkpoint"):
        checkpoint.decode(data)
