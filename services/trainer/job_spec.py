"""A federated job's spec: its ranges checked, and the aggregation strategy it names (pure)."""
from __future__ import annotations

import dataclasses
import math

from services.common.errors import InvalidArgument
from services.common.jobs import JobSpec
from services.trainer.strategy import FedAvg, make_strategy, or_default


def check_spec(spec: JobSpec) -> None:
    """Raise InvalidArgument naming the first field out of range (NaN and infinities first: every
    range check below would let NaN through, as comparisons with it are false). The optional
    settings are checked when set (None: the strategy's default, always in range)."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"federated job: {f.name} must be a finite number, got {value}")
    problems = [(spec.rounds < 1, "rounds must be >= 1"), (spec.min_clients < 1, "min_clients must be >= 1"),
                (not 0 < spec.fraction <= 1, "fraction must be in (0, 1]"),
                (spec.local_epochs < 1, "local_epochs must be >= 1"), (spec.lr <= 0, "lr must be > 0"),
                (spec.batch_size < 1, "batch_size must be >= 1"), (or_default(spec.mu, 0.0) < 0, "mu must be >= 0"),
                (spec.round_timeout_s < 0, "round_timeout_s must be >= 0"), (not spec.model, "model is required"),
                (not 0 <= or_default(spec.server_momentum, 0.0) < 1, "server_momentum must be in [0, 1)"),
                (or_default(spec.server_lr, 1.0) <= 0, "server_lr must be > 0 (a step of 0 never moves the model)"),
                (not 0 <= or_default(spec.server_beta2, 0.0) < 1, "server_beta2 must be in [0, 1)"),
                (or_default(spec.server_tau, 1.0) <= 0, "server_tau must be > 0 (m / (√v + τ): 0/0 where Δ is 0)"),
                (spec.dp_clip_norm < 0, "dp_clip_norm must be >= 0"),
                (spec.dp_noise_multiplier < 0, "dp_noise_multiplier must be >= 0")]
    for bad, message in problems:
        if bad:
            raise InvalidArgument(f"federated job: {message}")
    strategy_of(spec)


def strategy_of(spec: JobSpec) -> FedAvg:
    """The job's aggregation strategy, with its server optimiser and privacy settings."""
    return make_strategy(spec.strategy, spec.mu, spec.server_momentum, spec.server_lr, spec.server_beta2,
                         spec.server_tau, spec.dp_clip_norm, spec.dp_noise_multiplier)
