"""The adaptive server optimisers step as Flower's FedAdam, FedYogi and FedAdagrad do (their
aggregate_fit in flwr/server/strategy/fedadam.py, fedyogi.py, fedadagrad.py, fedopt.py) given the
same parameters, with Flower's defaults but tau 1e-3; server_momentum None is the default and 0 a
momentum of 0."""
from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.jobs import JobSpec
from services.trainer.convert import spec_from_proto, spec_to_proto
from services.trainer.job_spec import check_spec, strategy_of
from services.trainer.strategy import FedAvgM, FedOpt, make_strategy

# (name, eta, beta_1, beta_2, tau) as Flower's constructors default them
FLOWER_DEFAULTS = [("fedadam", 0.1, 0.9, 0.99, 1e-9), ("fedyogi", 1e-2, 0.9, 0.99, 1e-3),
                   ("fedadagrad", 0.1, 0.0, 0.0, 1e-9)]
# CNEI's: Flower's with tau 1e-3 (see strategy.ADAPTIVE_DEFAULTS)
CNEI_DEFAULTS = [(name, eta, beta_1, beta_2, 1e-3) for name, eta, beta_1, beta_2, _ in FLOWER_DEFAULTS]
START = [np.array([[0.5, -0.2, 0.0], [1.0, 0.3, -0.7]]), np.array([0.1, 0.0, -0.1])]
# the clients' weighted average in each of three rounds, as offsets from the global weights
PULLS = [[np.array([[0.2, -0.1, 0.05], [-0.3, 0.01, 0.4]]), np.array([0.02, -0.5, 0.1])],
         [np.array([[-0.1, 0.3, 0.05], [0.2, -0.02, 0.1]]), np.array([0.3, 0.1, -0.2])],
         [np.array([[0.05, 0.05, -0.4], [0.1, 0.2, -0.1]]), np.array([-0.1, 0.2, 0.3])]]


def flower_rounds(name: str, eta: float, beta_1: float, beta_2: float, tau: float) -> list[list[np.ndarray]]:
    """Flower's server step, written out from its source: Δ = aggregate − current; m and v start at
    zeros; FedAdam's η is bias-corrected with server_round counted from 1."""
    current, m_t, v_t, seen = [x.copy() for x in START], None, None, []
    for server_round, pull in enumerate(PULLS, start=1):
        aggregate = [x + p for x, p in zip(current, pull)]
        delta_t = [x - y for x, y in zip(aggregate, current)]
        m_t = m_t or [np.zeros_like(x) for x in delta_t]
        m_t = [beta_1 * x + (1 - beta_1) * y for x, y in zip(m_t, delta_t)]
        v_t = v_t or [np.zeros_like(x) for x in delta_t]
        if name == "fedadam":
            v_t = [beta_2 * x + (1 - beta_2) * y * y for x, y in zip(v_t, delta_t)]
            eta_t = eta * np.sqrt(1 - np.power(beta_2, server_round + 1.0)) / (1 - np.power(beta_1, server_round + 1.0))
        elif name == "fedyogi":
            v_t = [x - (1.0 - beta_2) * y * y * np.sign(x - y * y) for x, y in zip(v_t, delta_t)]
            eta_t = eta
        else:
            v_t = [x + y * y for x, y in zip(v_t, delta_t)]
            eta_t = eta
        current = [x + eta_t * y / (np.sqrt(z) + tau) for x, y, z in zip(current, m_t, v_t)]
        seen.append(current)
    return seen


def cnei_rounds(strategy) -> list[list[np.ndarray]]:
    weights = {"W0": START[0].astype(np.float32), "B0": START[1].astype(np.float32)}
    seen = []
    for pull in PULLS:
        average = {"W0": weights["W0"] + pull[0].astype(np.float32), "B0": weights["B0"] + pull[1].astype(np.float32)}
        weights = strategy.aggregate(weights, [(average, 3)])
        seen.append([weights["W0"], weights["B0"]])
    return seen


def _assert_same_rounds(name: str, got: list, expected: list) -> None:
    for round_no, (got_round, want_round) in enumerate(zip(got, expected, strict=True), start=1):
        for g, w in zip(got_round, want_round, strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6, err_msg=f"{name} round {round_no}")


@pytest.mark.parametrize(("name", "eta", "beta_1", "beta_2", "tau"), CNEI_DEFAULTS, ids=[d[0] for d in CNEI_DEFAULTS])
def test_each_adaptive_strategy_with_its_defaults_steps_as_flower_s_for_three_rounds(name, eta, beta_1, beta_2, tau):
    _assert_same_rounds(name, cnei_rounds(make_strategy(name)), flower_rounds(name, eta, beta_1, beta_2, tau))


@pytest.mark.parametrize(("name", "eta", "beta_1", "beta_2", "tau"), FLOWER_DEFAULTS, ids=[d[0] for d in FLOWER_DEFAULTS])
def test_each_adaptive_strategy_given_flower_s_defaults_steps_as_flower_s(name, eta, beta_1, beta_2, tau):
    strategy = make_strategy(name, server_lr=eta, tau=tau)
    _assert_same_rounds(name, cnei_rounds(strategy), flower_rounds(name, eta, beta_1, beta_2, tau))


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_set_optimiser_parameters_step_as_flower_s_with_the_same_parameters(name):
    strategy = make_strategy(name, momentum=0.5, server_lr=0.03, beta2=0.9, tau=1e-4)
    _assert_same_rounds(name, cnei_rounds(strategy), flower_rounds(name, 0.03, 0.5, 0.9, 1e-4))


def test_a_fedadam_job_taken_over_mid_way_keeps_its_bias_correction():
    first = make_strategy("fedadam")
    cnei_rounds(first)
    resumed = make_strategy("fedadam")
    resumed.restore(first.state())
    assert resumed.rounds == 3
    weights = {"W0": START[0].astype(np.float32), "B0": START[1].astype(np.float32)}
    update = {k: v + 0.1 for k, v in weights.items()}
    np.testing.assert_array_equal(resumed.aggregate(weights, [(update, 1)])["W0"],
                                  first.aggregate(weights, [(update, 1)])["W0"])


def test_a_server_momentum_of_zero_is_zero_and_unset_is_each_strategy_s_default():
    assert make_strategy("fedavgm", momentum=0.0).momentum == 0.0
    assert make_strategy("fedavgm").momentum == 0.9
    assert make_strategy("fedadam", momentum=0.0).beta1 == 0.0
    assert make_strategy("fedyogi").beta1 == 0.9
    assert make_strategy("fedadagrad").beta1 == 0.0
    zero = strategy_of(JobSpec(strategy="fedavgm", server_momentum=0.0))
    assert isinstance(zero, FedAvgM) and zero.momentum == 0.0
    check_spec(JobSpec(strategy="fedavgm", server_momentum=0.0))
    adam = strategy_of(JobSpec(strategy="fedadam"))
    assert isinstance(adam, FedOpt) and (adam.eta, adam.beta1, adam.beta2, adam.tau) == (0.1, 0.9, 0.99, 1e-3)


@pytest.mark.parametrize("changes", [{"momentum": 0.9}, {"beta2": 0.5}], ids=["momentum", "beta2"])
def test_fedadagrad_refuses_a_server_momentum_or_beta2_it_would_not_use(changes):
    with pytest.raises(InvalidArgument, match="fedadagrad has no server momentum"):
        make_strategy("fedadagrad", **changes)


def test_an_unset_server_momentum_travels_as_unset_on_the_wire():
    assert spec_from_proto(spec_to_proto(JobSpec(strategy="fedadam"))).server_momentum is None
    assert spec_from_proto(spec_to_proto(JobSpec(server_momentum=0.5))).server_momentum == 0.5
