"""Aggregation strategies: pure functions over named weights (FedAvg, FedAvgM, FedProx)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.common.errors import InvalidArgument
from services.common.federated import Named, check_same_shapes

STRATEGIES = ("fedavg", "fedavgm", "fedprox")


def weighted_average(updates: list[tuple[Named, int]]) -> Named:
    """Σ n_k·w_k / Σ n_k per tensor; every update must have the same tensors and shapes."""
    if not updates:
        raise InvalidArgument("cannot aggregate an empty list of updates")
    reference = updates[0][0]
    total = 0
    for i, (weights, samples) in enumerate(updates):
        check_same_shapes(reference, weights, f"update {i}")
        if samples < 0:
            raise InvalidArgument(f"update {i} claims {samples} samples")
        total += samples
    if total == 0:
        raise InvalidArgument("updates cover no samples")
    return {name: (sum(w[name].astype(np.float64) * n for w, n in updates) / total).astype(np.float32)
            for name in reference}


def momentum_step(global_weights: Named, average: Named, velocity: Named | None,
                  momentum: float, server_lr: float) -> tuple[Named, Named]:
    """FedAvgM (Hsu et al. 2019): v ← β·v + (w − avg); w ← w − η·v. Returns (weights, velocity)."""
    check_same_shapes(global_weights, average, "aggregate")
    new_velocity = {}
    for name, w in global_weights.items():
        delta = w - average[name]
        new_velocity[name] = (momentum * velocity[name] + delta) if velocity else delta
    weights = {name: (w - server_lr * new_velocity[name]).astype(np.float32)
               for name, w in global_weights.items()}
    return weights, new_velocity


class FedAvg:
    """McMahan et al.: the sample-weighted mean of the clients' weights."""

    name = "fedavg"
    client_mu = 0.0

    def aggregate(self, global_weights: Named, updates: list[tuple[Named, int]]) -> Named:
        return weighted_average(updates)


@dataclass
class FedAvgM(FedAvg):
    """FedAvg with server momentum; keeps its velocity between rounds."""

    momentum: float = 0.9
    server_lr: float = 1.0
    velocity: Named | None = field(default=None, repr=False)
    name = "fedavgm"

    def aggregate(self, global_weights: Named, updates: list[tuple[Named, int]]) -> Named:
        weights, self.velocity = momentum_step(global_weights, weighted_average(updates), self.velocity,
                                               self.momentum, self.server_lr)
        return weights


@dataclass
class FedProx(FedAvg):
    """Li et al.: FedAvg aggregation; clients add the proximal term mu/2·||w − w_global||²."""

    mu: float = 0.01
    name = "fedprox"

    @property
    def client_mu(self) -> float:  # type: ignore[override]
        return self.mu


def make_strategy(name: str, mu: float = 0.0, momentum: float = 0.0, server_lr: float = 0.0) -> FedAvg:
    """The strategy called `name`; zero parameters take each strategy's defaults."""
    key = (name or "fedavg").lower()
    if key == "fedavg":
        return FedAvg()
    if key == "fedavgm":
        return FedAvgM(momentum=momentum or 0.9, server_lr=server_lr or 1.0)
    if key == "fedprox":
        return FedProx(mu=mu or 0.01)
    raise InvalidArgument(f"unknown strategy '{name}' (known: {', '.join(STRATEGIES)})")
