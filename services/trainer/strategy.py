"""Aggregation strategies: pure functions over named weights (FedAvg, FedAvgM, FedProx, and the
adaptive server optimisers FedAdam, FedYogi, FedAdagrad of Reddi et al. 2021), optionally with
server-side differential privacy by fixed clipping (Flower's
DifferentialPrivacyServerSideFixedClipping: each client's update clipped to an L2 norm, Gaussian
noise on the aggregate)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.common.errors import InvalidArgument
from services.common.federated import Named, check_same_shapes

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
ADAPTIVE = {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}


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


def update_norm(global_weights: Named, weights: Named) -> float:
    """L2 norm of a client's update (its weights minus the global ones) over every tensor."""
    return float(np.sqrt(sum(np.sum((weights[n].astype(np.float64) - w) ** 2) for n, w in global_weights.items())))


def clip_update(global_weights: Named, weights: Named, clip_norm: float) -> Named:
    """The client's weights with its update scaled down to an L2 norm of at most `clip_norm`."""
    check_same_shapes(global_weights, weights, "update")
    norm = update_norm(global_weights, weights)
    if norm <= clip_norm:
        return weights
    scale = clip_norm / norm
    return {n: (w + scale * (weights[n] - w)).astype(np.float32) for n, w in global_weights.items()}


def gaussian_noise(weights: Named, std: float, rng: np.random.Generator) -> Named:
    """Each tensor plus independent N(0, std²) noise."""
    return {n: (w + rng.normal(0.0, std, w.shape)).astype(np.float32) for n, w in weights.items()}


# Each adaptive optimiser's defaults: (eta, beta1, beta2, tau). Flower's, except tau: Flower's 1e-9
# for FedAdam and FedAdagrad makes every weight move by about eta each round however small its
# update (m/√v ≈ ±1), which wrecks a trained model under DP noise; 1e-3 is in Reddi et al.'s range.
# FedAdagrad has no first moment decay (beta1 = 0: m = Δ) and no beta2.
ADAPTIVE_DEFAULTS = {"adam": (0.1, 0.9, 0.99, 1e-3), "yogi": (0.01, 0.9, 0.99, 1e-3), "adagrad": (0.1, 0.0, 0.0, 1e-3)}


def adam_learning_rate(eta: float, beta1: float, beta2: float, server_round: int) -> float:
    """FedAdam's bias-corrected server learning rate in round `server_round` (from 1), as Flower
    writes it: η·√(1 − β2^(t+1)) / (1 − β1^(t+1))."""
    return eta * np.sqrt(1 - beta2 ** (server_round + 1.0)) / (1 - beta1 ** (server_round + 1.0))


def adaptive_step(kind: str, global_weights: Named, average: Named, m: Named | None, v: Named | None,
                  eta: float, beta1: float, beta2: float, tau: float,
                  server_round: int = 1) -> tuple[Named, Named, Named]:
    """One server step of FedAdam / FedYogi / FedAdagrad on the pseudo-gradient Δ = avg − w, as
    Flower computes it: m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ² (adam), v − (1−β2)·Δ²·sign(v − Δ²)
    (yogi), v + Δ² (adagrad); w ← w + η·m / (√v + τ), η bias-corrected for adam
    (`adam_learning_rate`). m and v start at 0. Returns (weights, m, v)."""
    check_same_shapes(global_weights, average, "aggregate")
    if kind == "adam":
        eta = adam_learning_rate(eta, beta1, beta2, server_round)
    weights, new_m, new_v = {}, {}, {}
    for name, w in global_weights.items():
        delta = average[name].astype(np.float64) - w
        prev_m = m[name] if m else np.zeros_like(delta)
        prev_v = v[name] if v else np.zeros_like(delta)
        new_m[name] = beta1 * prev_m + (1 - beta1) * delta
        square = delta * delta
        if kind == "adam":
            new_v[name] = beta2 * prev_v + (1 - beta2) * square
        elif kind == "yogi":
            new_v[name] = prev_v - (1 - beta2) * square * np.sign(prev_v - square)
        elif kind == "adagrad":
            new_v[name] = prev_v + square
        else:
            raise InvalidArgument(f"unknown adaptive optimiser '{kind}'")
        weights[name] = (w + eta * new_m[name] / (np.sqrt(new_v[name]) + tau)).astype(np.float32)
    return weights, new_m, new_v


@dataclass
class Privacy:
    """Server-side differential privacy with fixed clipping: every update clipped to `clip_norm`,
    averaged with equal weights (DP-FedAvg, McMahan et al. 2018: the noise below is calibrated to
    one client moving the mean by at most clip_norm / clients, which a client claiming many samples
    would break under sample weighting), then N(0, (noise_multiplier·clip_norm / clients)²) added
    to each aggregated weight."""

    clip_norm: float
    noise_multiplier: float = 0.0
    rng: np.random.Generator = field(default_factory=np.random.default_rng, repr=False)

    def average(self, global_weights: Named, updates: list[tuple[Named, int]]) -> Named:
        clipped = [(clip_update(global_weights, w, self.clip_norm), 1) for w, _ in updates]
        average = weighted_average(clipped)
        if self.noise_multiplier <= 0:
            return average
        return gaussian_noise(average, self.noise_multiplier * self.clip_norm / len(updates), self.rng)


@dataclass
class FedAvg:
    """McMahan et al.: the sample-weighted mean of the clients' weights. Every strategy averages
    the same way (with `privacy`: clipped and noised), then takes its own server step."""

    privacy: Privacy | None = field(default=None, kw_only=True)
    name = "fedavg"
    client_mu = 0.0

    def aggregate(self, global_weights: Named, updates: list[tuple[Named, int]]) -> Named:
        if self.privacy is not None:
            return self.step(global_weights, self.privacy.average(global_weights, updates))
        return self.step(global_weights, weighted_average(updates))

    def step(self, global_weights: Named, average: Named) -> Named:
        return average

    def state(self) -> dict[str, Named]:
        """The server optimiser's state between rounds (checkpointed with the weights)."""
        return {}

    def restore(self, state: dict[str, Named]) -> None:
        """Take up `state` from a checkpoint."""


@dataclass
class FedAvgM(FedAvg):
    """FedAvg with server momentum; keeps its velocity between rounds."""

    momentum: float = 0.9
    server_lr: float = 1.0
    velocity: Named | None = field(default=None, repr=False)
    name = "fedavgm"

    def step(self, global_weights: Named, average: Named) -> Named:
        weights, self.velocity = momentum_step(global_weights, average, self.velocity, self.momentum, self.server_lr)
        return weights

    def state(self) -> dict[str, Named]:
        return {"velocity": self.velocity} if self.velocity else {}

    def restore(self, state: dict[str, Named]) -> None:
        self.velocity = state.get("velocity") or None


@dataclass
class FedProx(FedAvg):
    """Li et al.: FedAvg aggregation; clients add the proximal term mu/2·||w − w_global||²."""

    mu: float = 0.01
    name = "fedprox"

    @property
    def client_mu(self) -> float:  # type: ignore[override]
        return self.mu


@dataclass
class FedOpt(FedAvg):
    """Reddi et al. 2021, adaptive federated optimisation: the server treats avg − w as a
    pseudo-gradient for Adam, Yogi or Adagrad (`kind`) and keeps its moments and its round count
    (FedAdam's bias correction depends on it) between rounds."""

    kind: str = "adam"
    eta: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-9
    m: Named | None = field(default=None, repr=False)
    v: Named | None = field(default=None, repr=False)
    rounds: int = 0  # server steps taken

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"fed{self.kind}"

    def step(self, global_weights: Named, average: Named) -> Named:
        weights, self.m, self.v = adaptive_step(self.kind, global_weights, average, self.m, self.v,
                                                self.eta, self.beta1, self.beta2, self.tau, self.rounds + 1)
        self.rounds += 1
        return weights

    def state(self) -> dict[str, Named]:
        if not (self.m and self.v):
            return {}
        return {"m": self.m, "v": self.v, "rounds": {"rounds": np.array(self.rounds, np.int64)}}

    def restore(self, state: dict[str, Named]) -> None:
        self.m, self.v = state.get("m") or None, state.get("v") or None
        self.rounds = int(state["rounds"]["rounds"]) if "rounds" in state else (1 if self.m else 0)


def make_strategy(name: str, mu: float | None = None, momentum: float | None = None, server_lr: float | None = None,
                  beta2: float | None = None, tau: float | None = None, clip_norm: float = 0.0,
                  noise_multiplier: float = 0.0) -> FedAvg:
    """The strategy called `name`. `mu`, `momentum`, `server_lr`, `beta2` and `tau` None take
    each strategy's defaults (FedProx: mu 0.01; FedAvgM: momentum 0.9, server_lr 1; the adaptive
    ones: Flower's, see ADAPTIVE_DEFAULTS); a number, 0 included, is that number. `clip_norm` > 0
    adds server-side differential privacy (fixed clipping, Gaussian noise of `noise_multiplier`)."""
    key = (name or "fedavg").lower()
    privacy = Privacy(clip_norm, noise_multiplier) if clip_norm > 0 else None
    if noise_multiplier > 0 and privacy is None:
        raise InvalidArgument("dp_noise_multiplier needs dp_clip_norm > 0 (the noise is scaled by the clipping norm)")
    if key == "fedavg":
        return FedAvg(privacy=privacy)
    if key == "fedavgm":
        return FedAvgM(momentum=or_default(momentum, 0.9), server_lr=or_default(server_lr, 1.0), privacy=privacy)
    if key == "fedprox":
        return FedProx(mu=or_default(mu, 0.01), privacy=privacy)
    if key in ADAPTIVE:
        kind = ADAPTIVE[key]
        eta, beta1, default_beta2, default_tau = ADAPTIVE_DEFAULTS[kind]
        if kind == "adagrad" and (momentum or beta2):
            raise InvalidArgument("fedadagrad has no server momentum or second-moment decay (m is the update "
                                  "itself and v sums its squares, as in Flower): leave server_momentum and "
                                  "server_beta2 unset")
        return FedOpt(kind=kind, eta=or_default(server_lr, eta), beta1=or_default(momentum, beta1),
                      beta2=or_default(beta2, default_beta2), tau=or_default(tau, default_tau), privacy=privacy)
    raise InvalidArgument(f"unknown strategy '{name}' (known: {', '.join(STRATEGIES)})")


def or_default(value: float | None, default: float) -> float:
    """`value` unless it is None (a setting left out)."""
    return default if value is None else value
