"""Precision selection: choose a model variant from its measured accuracy and latency (pure)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from services.common import model_metadata
from services.common.batcher import number_param
from services.common.deployment import PRECISION_RANGES, DeploymentSpec, range_words
from services.common.errors import FailedPrecondition, InvalidArgument, ModelNotFound
from services.common.model_spec import ModelVariant


@dataclass(frozen=True)
class PrecisionPolicy:
    """What a request (or a deployment's default) asks of the variant."""

    precision: str = ""
    accuracy_floor: float | None = None
    latency_budget_ms: float | None = None

    @property
    def empty(self) -> bool:
        return not self.precision and self.accuracy_floor is None and self.latency_budget_ms is None


def _number(params: dict, key: str) -> float | None:
    """A finite number in its range (`PRECISION_RANGES`), or None when absent (NaN meets no floor
    and fits no budget, a floor above 1 or a negative budget no measurement: the client's error)."""
    if key not in params or params[key] in ("", None):
        return None
    value, (low, high) = number_param(params, key, float), PRECISION_RANGES[key]
    if not low <= value <= high:
        raise InvalidArgument(f"parameter '{key}' must be {range_words(low, high)}, got {params[key]!r}")
    return value


def policy_from_params(params: dict) -> PrecisionPolicy:
    """Read `precision`, `accuracy_floor`, `latency_budget_ms` from OIP request parameters."""
    return PrecisionPolicy(
        precision=str(params.get("precision", "") or "").upper(),
        accuracy_floor=_number(params, "accuracy_floor"),
        latency_budget_ms=_number(params, "latency_budget_ms"),
    )


def request_policy(params: dict, spec: DeploymentSpec) -> PrecisionPolicy:
    """What a request asks of the variant (`policy_from_params`), else its deployment's default."""
    policy = policy_from_params(params)
    if policy.empty:
        p = spec.precision
        policy = PrecisionPolicy(p.precision.upper(), p.accuracy_floor, p.latency_budget_ms)
    return policy


def accuracy(v: ModelVariant) -> float | None:
    """The variant's accuracy (None: none stated, or none that reads as a fraction)."""
    return model_metadata.value(v.metadata, model_metadata.ACCURACY, v.key)


def latency_ms(v: ModelVariant, node_class: str) -> float | None:
    """Measured batch-1 latency of the variant on a node class (recorded by runtimes)."""
    return model_metadata.value(v.metadata, f"{model_metadata.LATENCY_PREFIX}{node_class}", v.key)


_DEFAULT_ORDER = {"FP32": 0, "FP16": 1, "INT8": 2}


def _known(measured: float | None, unmeasured: float) -> float:
    """A measurement, `unmeasured` standing in only when there is none (0.0 is a measurement)."""
    return unmeasured if measured is None else measured


def choose_variant(variants: list[ModelVariant], policy: PrecisionPolicy, node_class: str) -> ModelVariant:
    """Explicit precision wins; else the fastest variant meeting `accuracy_floor`, or the most
    accurate one within `latency_budget_ms` (both: the fastest meeting both); else FP32 first.

    Unknown latency counts as slowest; unknown accuracy never meets a floor."""
    if not variants:
        raise ModelNotFound("?")
    name = variants[0].name
    if policy.precision:
        for v in variants:
            if v.precision == policy.precision:
                return v
        raise ModelNotFound(name, variants[0].version, policy.precision)
    pool = list(variants)
    if policy.accuracy_floor is not None:
        pool = [v for v in pool if _known(accuracy(v), -1.0) >= policy.accuracy_floor]
        if not pool:
            known = [a for a in map(accuracy, variants) if a is not None]
            detail = f"best measured accuracy {max(known):.4f}" if known else "no variant has a measured accuracy"
            raise FailedPrecondition(f"no variant of model '{name}' meets accuracy_floor {policy.accuracy_floor} "
                                     f"({detail})")
    if policy.latency_budget_ms is not None:
        fits = [v for v in pool if _known(latency_ms(v, node_class), math.inf) <= policy.latency_budget_ms]
        if not fits:
            known = [latency_ms(v, node_class) for v in pool if latency_ms(v, node_class) is not None]
            detail = f"fastest measured {min(known):.3f} ms" if known else "no latency measured yet"
            raise FailedPrecondition(
                f"no variant of model '{name}' fits latency_budget_ms {policy.latency_budget_ms} "
                f"on {node_class} nodes ({detail})")
        if policy.accuracy_floor is None:
            return max(fits, key=lambda v: (accuracy(v) or 0.0, -_DEFAULT_ORDER.get(v.precision, 9)))
        pool = fits
    if policy.accuracy_floor is not None:
        return min(pool, key=lambda v: (_known(latency_ms(v, node_class), math.inf),
                                        _DEFAULT_ORDER.get(v.precision, 9)))
    return min(pool, key=lambda v: _DEFAULT_ORDER.get(v.precision, 9))
