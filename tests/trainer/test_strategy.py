"""Aggregation maths: weighted FedAvg, FedAvgM momentum, FedProx, the adaptive server optimisers,
server-side differential privacy, rejected inputs; client choice."""
from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument, TensorError
from services.common.nodes import NodeInfo
from services.trainer.selection import next_version, select_clients
from services.common.jobs import JobSpec
from services.trainer.job_spec import check_spec
from services.trainer.strategy import (FedAvg, FedAvgM, FedOpt, FedProx, Privacy, adaptive_step, clip_update,
                                       make_strategy, momentum_step, update_norm, weighted_average)


def _w(value: float, shape=(2, 3)) -> dict[str, np.ndarray]:
    return {"W0": np.full(shape, value, np.float32), "B0": np.full(shape[1:], value, np.float32)}


def test_fedavg_weights_each_update_by_its_number_of_samples():
    avg = weighted_average([(_w(1.0), 10), (_w(4.0), 30)])
    np.testing.assert_allclose(avg["W0"], np.full((2, 3), (1 * 10 + 4 * 30) / 40))
    np.testing.assert_allclose(avg["B0"], np.full(3, 3.25))
    assert avg["W0"].dtype == np.float32


def test_fedavg_of_one_update_is_that_update():
    one = {"W0": np.arange(6, dtype=np.float32).reshape(2, 3), "B0": np.ones(3, np.float32)}
    np.testing.assert_array_equal(FedAvg().aggregate(_w(0.0), [(one, 7)])["W0"], one["W0"])


def test_an_empty_list_of_updates_is_rejected():
    with pytest.raises(InvalidArgument, match="empty"):
        weighted_average([])


@pytest.mark.parametrize("other, match", [
    ({"W0": np.zeros((2, 3), np.float32)}, "differ"),
    ({"W0": np.zeros((3, 3), np.float32), "B0": np.zeros(3, np.float32)}, "shape"),
])
def test_updates_with_other_tensors_or_shapes_are_rejected(other, match):
    with pytest.raises(InvalidArgument, match=match):
        weighted_average([(_w(1.0), 5), (other, 5)])


def test_updates_covering_no_samples_are_rejected():
    with pytest.raises(InvalidArgument, match="no samples"):
        weighted_average([(_w(1.0), 0), (_w(2.0), 0)])


def test_fedavgm_without_momentum_at_server_lr_1_equals_fedavg():
    strategy = FedAvgM(momentum=0.0, server_lr=1.0)
    out = strategy.aggregate(_w(1.0), [(_w(3.0), 1), (_w(5.0), 1)])
    np.testing.assert_allclose(out["W0"], 4.0)


def test_fedavgm_carries_server_momentum_between_rounds():
    strategy = FedAvgM(momentum=0.5, server_lr=1.0)
    first = strategy.aggregate(_w(0.0), [(_w(1.0), 1)])  # delta -1 -> v = -1 -> w = 1
    np.testing.assert_allclose(first["W0"], 1.0)
    second = strategy.aggregate(first, [(_w(2.0), 1)])  # v = 0.5·(-1) + (-1) = -1.5 -> w = 2.5
    np.testing.assert_allclose(second["W0"], 2.5)
    np.testing.assert_allclose(strategy.velocity["W0"], -1.5)


def test_momentum_step_scales_by_the_server_learning_rate():
    weights, velocity = momentum_step(_w(2.0), _w(0.0), None, momentum=0.9, server_lr=0.5)
    np.testing.assert_allclose(weights["W0"], 1.0)
    np.testing.assert_allclose(velocity["W0"], 2.0)


def test_fedprox_aggregates_like_fedavg_and_sends_mu_to_clients():
    strategy = make_strategy("FedProx", mu=0.1)
    assert isinstance(strategy, FedProx) and strategy.client_mu == pytest.approx(0.1)
    assert FedAvg().client_mu == 0.0
    out = strategy.aggregate(_w(0.0), [(_w(2.0), 1), (_w(4.0), 3)])
    np.testing.assert_allclose(out["W0"], 3.5)


def test_an_unknown_strategy_is_an_invalid_argument():
    with pytest.raises(InvalidArgument, match="unknown strategy 'scaffold'"):
        make_strategy("scaffold")


@pytest.mark.parametrize(("kind", "expected_v"), [
    ("adam", 0.99 * 4.0 + 0.01 * 1.0),     # exponential average
    ("yogi", 4.0 - 0.01 * 1.0),            # v > Δ²: decreases additively, sign(v − Δ²) = +1
    ("adagrad", 4.0 + 1.0),                # accumulates
])
def test_each_adaptive_optimiser_updates_its_second_moment_its_own_way(kind, expected_v):
    _, _, v = adaptive_step(kind, _w(0.0), _w(1.0), _w(0.0), _w(4.0), 0.1, 0.9, 0.99, 1e-3)
    np.testing.assert_allclose(v["W0"], expected_v)


def test_adaptive_strategies_keep_their_moments_and_a_restored_one_steps_the_same():
    strategy = make_strategy("fedyogi", server_lr=0.05)
    assert isinstance(strategy, FedOpt) and strategy.name == "fedyogi" and strategy.eta == 0.05
    first = strategy.aggregate(_w(0.0), [(_w(1.0), 2), (_w(3.0), 2)])
    assert set(strategy.state()) == {"m", "v", "rounds"}
    resumed = make_strategy("fedyogi", server_lr=0.05)
    resumed.restore(strategy.state())
    np.testing.assert_allclose(resumed.aggregate(first, [(_w(2.5), 1)])["W0"],
                               strategy.aggregate(first, [(_w(2.5), 1)])["W0"])
    assert make_strategy("fedadagrad").state() == {}  # nothing before its first round


def test_an_update_is_clipped_to_the_norm_and_a_small_one_is_left_alone():
    base, far = _w(0.0), _w(2.0)
    assert update_norm(base, far) == pytest.approx(np.sqrt(9 * 4.0))  # 6 + 3 entries of 2
    clipped = clip_update(base, far, 1.5)
    assert update_norm(base, clipped) == pytest.approx(1.5, rel=1e-6)
    np.testing.assert_allclose(clipped["W0"] / clipped["B0"][0], 1.0)  # direction kept
    np.testing.assert_array_equal(clip_update(base, _w(0.1), 1.5)["W0"], _w(0.1)["W0"])


def test_differential_privacy_bounds_each_client_s_pull_and_adds_noise_of_the_set_scale():
    base = {"W": np.zeros((400, 250), np.float32)}
    outlier = {"W": np.full((400, 250), 10.0, np.float32)}
    quiet = Privacy(clip_norm=1.0).average(base, [(outlier, 1), (base, 1)])
    assert update_norm(base, quiet) == pytest.approx(0.5, rel=1e-5)  # the outlier moved it by 1/2 at most
    noisy = Privacy(clip_norm=1.0, noise_multiplier=2.0, rng=np.random.default_rng(7)).average(
        base, [(base, 1), (base, 1), (base, 1), (base, 1)])
    assert noisy["W"].std() == pytest.approx(2.0 * 1.0 / 4, rel=0.02)  # σ·C / clients
    assert abs(float(noisy["W"].mean())) < 0.01


def test_under_differential_privacy_clipped_updates_count_equally_whatever_samples_they_claim():
    base = {"W": np.zeros((2, 2), np.float32)}
    greedy, honest = {"W": np.full((2, 2), 10.0, np.float32)}, {"W": np.full((2, 2), -0.2, np.float32)}
    average = Privacy(clip_norm=1.0).average(base, [(greedy, 1_000_000), (honest, 10)])
    np.testing.assert_allclose(average["W"], (0.5 + -0.2) / 2, rtol=1e-6)  # greedy clipped to 0.5 per entry
    assert update_norm(base, average) <= 1.0 / 2 + 0.4 / 2 + 1e-6  # each moved it by at most clip_norm / 2


def test_every_strategy_takes_the_privacy_settings_and_noise_needs_a_clipping_norm():
    for name in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
        strategy = make_strategy(name, clip_norm=0.5, noise_multiplier=1.1)
        assert strategy.privacy == Privacy(0.5, 1.1, strategy.privacy.rng)
    assert make_strategy("fedavg").privacy is None
    with pytest.raises(InvalidArgument, match="dp_noise_multiplier needs dp_clip_norm"):
        make_strategy("fedavg", noise_multiplier=1.0)


@pytest.mark.parametrize(("changes", "message"), [
    ({"server_beta2": 1.0}, "server_beta2 must be in"), ({"server_momentum": 1.5}, "server_momentum must be in"),
    ({"dp_clip_norm": -1.0}, "dp_clip_norm must be >= 0"), ({"dp_noise_multiplier": 1.0}, "needs dp_clip_norm"),
    ({"strategy": "fedadam", "server_tau": -1.0}, "server_tau must be > 0"),
    ({"strategy": "fedadam", "server_tau": 0.0}, "server_tau must be > 0"),
    ({"strategy": "fedavgm", "server_lr": 0.0}, "server_lr must be > 0"), ({"mu": -0.1}, "mu must be >= 0"),
])
def test_job_specs_with_optimiser_or_privacy_settings_out_of_range_are_refused(changes, message):
    with pytest.raises(InvalidArgument, match=message):
        check_spec(JobSpec(**changes))


def _node(node_id: str, tier: str = "edge") -> NodeInfo:
    return NodeInfo(node_id=node_id, tier=tier, region="r", address=f"{node_id}:1")


def test_client_choice_takes_a_fraction_of_the_edge_nodes_but_at_least_min_clients():
    nodes = [_node(f"e{i}") for i in range(10)] + [_node("cloud-1", "cloud")]
    assert len(select_clients(nodes, "edge", 0.3, 1, seed=1)) == 3
    assert len(select_clients(nodes, "edge", 0.1, 4, seed=1)) == 4
    assert all(n.tier == "edge" for n in select_clients(nodes, "edge", 1.0, 1, seed=1))
    assert select_clients(nodes, "edge", 0.5, 1, seed=7) == select_clients(nodes, "edge", 0.5, 1, seed=7)
    assert len(select_clients(nodes[:2], "edge", 1.0, 5, seed=1)) == 2


@pytest.mark.parametrize("versions, expected", [([], "1"), (["1"], "2"), (["1", "10", "2", "x"], "11")])
def test_the_next_version_follows_the_highest_numeric_one(versions, expected):
    assert next_version(versions) == expected


def test_mismatched_shapes_name_the_tensor():
    with pytest.raises(TensorError, match="tensor 'W0'"):
        weighted_average([(_w(1.0), 1), ({**_w(1.0), "W0": np.zeros((2, 2), np.float32)}, 1)])
