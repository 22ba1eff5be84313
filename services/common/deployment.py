"""ModelDeployment spec: how one model is served (batching, precision, placement, fallback)."""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from services.common.ensemble_plan import ensemble_plan
from services.common.errors import InvalidArgument

SCHEDULER_POLICIES = ("edgeai", "least_loaded", "round_robin", "random")
JOINT_MODES = ("off", "sync", "async")
PRECISIONS = ("FP32", "FP16", "INT8")  # a variant's, and what a deployment may ask for
INT32_MAX, UINT32_MAX = 2**31 - 1, 2**32 - 1
# What each batching integer may be: the front door's RouteReply carries them as uint32,
# ModelConfig max_batch_size (and preferred sizes, at most it) as int32
BATCHING_RANGES = {"max_batch_size": (1, INT32_MAX), "max_queue_delay_us": (0, UINT32_MAX),
                   "max_queue_size": (1, UINT32_MAX), "max_inflight_batches": (1, UINT32_MAX)}
# What a precision policy may ask, of a deployment or as a request's parameter: a measured
# accuracy is a share of right answers, a measured latency is never negative
PRECISION_RANGES = {"accuracy_floor": (0.0, 1.0), "latency_budget_ms": (0.0, math.inf)}
# What each number of a put spec besides batching's may be, by its field's path (None: no limit asked)
NUMBER_RANGES = {**{f"precision.{name}": bounds for name, bounds in PRECISION_RANGES.items()},
                 "scheduler.threshold": (0.0, 1.0),  # a node's score is a weighted mean of parts in [0, 1]
                 "joint.latency_threshold_ms": (0.0, math.inf),  # an RTT is never negative
                 "attempt_timeout_ms": (1.0, UINT32_MAX)}  # the route reply carries whole ms as uint32


@dataclass(frozen=True)
class BatchingSpec:
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    max_inflight_batches: int = 1


@dataclass(frozen=True)
class PrecisionSpec:
    """Default precision policy when a request says nothing."""

    precision: str = ""
    accuracy_floor: float | None = None
    latency_budget_ms: float | None = None


@dataclass(frozen=True)
class SchedulerSpec:
    """EdgeAIScheduler: total = alpha*resource + beta*locality + gamma*model + delta*network."""

    policy: str = "edgeai"
    alpha: float = 0.35
    beta: float = 0.2
    gamma: float = 0.2
    delta: float = 0.25
    threshold: float = 0.3


@dataclass(frozen=True)
class JointSpec:
    """Edge-cloud joint inference: answer at the edge, escalate or validate in the cloud."""

    mode: str = "off"  # off | sync (escalate low confidence) | async (validate in background)
    edge_precision: str = ""  # variant used at the edge, e.g. INT8 ("" = the usual choice)
    cloud_model: str = ""  # the cloud model ("" = the same model)
    cloud_version: str = ""
    cloud_precision: str = "FP32"
    threshold: float = 0.85  # top-1 confidence below this is escalated (sync)
    latency_threshold_ms: float = 50.0  # edge->cloud RTT above this: keep the edge answer
    output: str = ""  # the probabilities output ("" = the model's first output)


@dataclass(frozen=True)
class RolloutSpec:
    """Which version serves requests that name none (KServe's canary rollout): `stable` (""
    = the latest: the newest holding every precision the deployment needs, see
    `served.latest_version`), and `canary`, which takes `canary_percent` of them at random.
    Rolling back clears the canary; promoting makes it the stable version."""

    stable: str = ""
    canary: str = ""
    canary_percent: float = 0.0


def rollout_version(rollout: RolloutSpec, draw: float) -> str:
    """The version a request that names none is served by, for a uniform `draw` in [0, 1):
    the canary for the first `canary_percent` %, else the stable one ("" = the latest)."""
    if rollout.canary and draw * 100.0 < rollout.canary_percent:
        return rollout.canary
    return rollout.stable


@dataclass(frozen=True)
class EnsembleStep:
    """One model of an ensemble (Triton's ensemble_scheduling step). `inputs` are
    "<model input>=<ensemble tensor>", `outputs` "<model output>=<ensemble tensor>": a tensor is
    one of the ensemble's inputs or an earlier step's output. `tier` places the step (edge or
    cloud: split inference), `precision` picks its variant ("": the model's deployment decides)."""

    model: str
    version: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    tier: str = ""
    precision: str = ""


@dataclass(frozen=True)
class DeploymentSpec:
    model: str
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    precision: PrecisionSpec = field(default_factory=PrecisionSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    cloud_fallback: bool = True
    tiers: tuple[str, ...] = ("edge", "cloud")
    attempt_timeout_ms: float = 2000.0  # one node's share of a request before failing over
    hedge_after_ms: float = 0.0  # 0: no hedging; -1: after the model's observed p95; >0: fixed
    joint: JointSpec = field(default_factory=JointSpec)
    # Triton's response cache: answer inputs answered before from the coordinator's memory
    response_cache: bool = False
    # An ensemble: `model` names no registered model but this pipeline of models (Triton's
    # ensemble); its inputs are the tensors no step produces, its outputs those no step consumes.
    ensemble: tuple[EnsembleStep, ...] = ()
    # The version requests that name none get: a pinned stable one and a canary's share.
    rollout: RolloutSpec = field(default_factory=RolloutSpec)


_NESTED = {"batching": BatchingSpec, "precision": PrecisionSpec, "scheduler": SchedulerSpec,
           "joint": JointSpec, "rollout": RolloutSpec}


def _conform(value: Any, hint: Any, where: str) -> Any:
    """`value` as its field's annotated type (JSON lists -> tuples, ints -> floats), or
    INVALID_ARGUMENT naming the field: a stored spec must not fail later, inside serving."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise InvalidArgument(f"deployment field '{where}' must be a list, got {value!r}")
        return tuple(_conform(v, args[0], where) for v in value)
    if type(None) in args:
        return None if value is None else _conform(value, args[0], where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (isinstance(value, bool) and hint is not bool):
        raise InvalidArgument(f"deployment field '{where}' must be {hint.__name__}, got {value!r}")
    return value


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise InvalidArgument(f"deployment '{where}' must be an object")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InvalidArgument(f"deployment '{where}' has unknown fields {unknown} (known: {sorted(names)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key in _NESTED and cls is DeploymentSpec:
            values[key] = _build(_NESTED[key], value, f"{where}.{key}")
        elif key == "ensemble" and cls is DeploymentSpec:
            if not isinstance(value, (list, tuple)):
                raise InvalidArgument(f"deployment field '{where}.ensemble' must be a list of steps, got {value!r}")
            values[key] = tuple(_build(EnsembleStep, step, f"{where}.ensemble[{i}]") for i, step in enumerate(value))
        else:
            values[key] = _conform(value, hints[key], f"{where}.{key}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise InvalidArgument(f"deployment '{where}': {exc}") from None


def _non_finite(value: Any, where: str) -> str | None:
    """The path of the first NaN or infinite number in a spec (they pass every range check, as
    every comparison with NaN is false), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if dataclasses.is_dataclass(value):
        value = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        return next(filter(None, (_non_finite(v, f"{where}.{k}") for k, v in value)), None)
    if isinstance(value, tuple):
        return next(filter(None, (_non_finite(v, f"{where}[{i}]") for i, v in enumerate(value))), None)
    return None


def check_batching(b: BatchingSpec, model: str) -> None:
    """INVALID_ARGUMENT naming a batching integer out of its range (`BATCHING_RANGES`), or a
    preferred batch size that is not from 1 to `max_batch_size`."""
    for name, (low, high) in BATCHING_RANGES.items():
        value = getattr(b, name)
        if not low <= value <= high:
            why = f" ({name} must {'not be negative' if low == 0 else 'be positive'})" if value < low else ""
            raise InvalidArgument(f"deployment field '{model}.batching.{name}' must be from {low} to {high}, "
                                  f"got {value}{why}")
    bad = [size for size in b.preferred_batch_sizes if not 1 <= size <= b.max_batch_size]
    if bad:
        raise InvalidArgument(f"deployment field '{model}.batching.preferred_batch_sizes' must hold sizes from 1 "
                              f"to max_batch_size {b.max_batch_size}, got {list(bad)}")


def range_words(low: float, high: float) -> str:
    """'from 0 to 1', or 'at least 0' where there is no upper limit."""
    return f"at least {low:.12g}" if high == math.inf else f"from {low:.12g} to {high:.12g}"


def check_numbers(spec: DeploymentSpec) -> None:
    """INVALID_ARGUMENT naming a number out of its range (`NUMBER_RANGES`)."""
    for path, (low, high) in NUMBER_RANGES.items():
        value = spec
        for name in path.split("."):
            value = getattr(value, name)
        if value is not None and not low <= value <= high:
            raise InvalidArgument(f"deployment field '{spec.model}.{path}' must be {range_words(low, high)}, "
                                  f"got {value:.12g}")


def serving_tiers(spec: DeploymentSpec) -> set[str]:
    """The tiers the deployment's requests may run on (the cloud only with `cloud_fallback`)."""
    return set(spec.tiers) if spec.cloud_fallback else set(spec.tiers) - {"cloud"}


def check_serving(spec: DeploymentSpec) -> None:
    """INVALID_ARGUMENT when no node could be chosen: no tier to serve on (an ensemble's steps
    have their own), or edgeai weights that score every node 0."""
    if not serving_tiers(spec) and not spec.ensemble:
        why = " (the cloud serves only with cloud_fallback)" if "cloud" in spec.tiers else ""
        raise InvalidArgument(f"deployment field '{spec.model}.tiers' must name a tier the model can be served on, "
                              f"got {list(spec.tiers)}{why}")
    s = spec.scheduler
    if s.policy == "edgeai" and not any((s.alpha, s.beta, s.gamma, s.delta)):
        raise InvalidArgument(f"deployment field '{spec.model}.scheduler' weights must not all be 0 under the "
                              f"edgeai policy (every node would score 0)")


def validate(spec: DeploymentSpec) -> DeploymentSpec:
    b, s = spec.batching, spec.scheduler
    if not spec.model:
        raise InvalidArgument("deployment needs a 'model'")
    if where := _non_finite(spec, spec.model):
        raise InvalidArgument(f"deployment field '{where}' must be a finite number")
    check_batching(b, spec.model)
    if s.policy not in SCHEDULER_POLICIES:
        raise InvalidArgument(f"scheduler policy {s.policy!r} must be one of {list(SCHEDULER_POLICIES)}")
    if min(s.alpha, s.beta, s.gamma, s.delta) < 0:
        raise InvalidArgument("scheduler weights must not be negative")
    if spec.attempt_timeout_ms <= 0:
        raise InvalidArgument("attempt_timeout_ms must be positive")
    if spec.hedge_after_ms < 0 and spec.hedge_after_ms != -1:
        raise InvalidArgument("hedge_after_ms must be 0 (off), -1 (p95) or a positive delay")
    if spec.joint.mode not in JOINT_MODES:
        raise InvalidArgument(f"joint mode {spec.joint.mode!r} must be one of {list(JOINT_MODES)}")
    if not 0.0 <= spec.joint.threshold <= 1.0:
        raise InvalidArgument("joint threshold must be between 0 and 1")
    bad_tiers = set(spec.tiers) - {"edge", "cloud"}
    if bad_tiers:
        raise InvalidArgument(f"unknown tiers {sorted(bad_tiers)}")
    if spec.ensemble:
        ensemble_plan(spec)
    r = spec.rollout
    if not 0.0 <= r.canary_percent <= 100.0:
        raise InvalidArgument(f"rollout canary_percent must be between 0 and 100, got {r.canary_percent}")
    if r.canary and r.canary == r.stable:
        raise InvalidArgument(f"rollout canary version {r.canary} is also the stable version")
    if r.canary_percent > 0 and not r.canary:
        raise InvalidArgument("rollout canary_percent needs a canary version")
    if spec.ensemble and (r.stable or r.canary):
        raise InvalidArgument("an ensemble has no versions to roll out (its steps name theirs)")
    return spec


def check_put(spec: DeploymentSpec) -> DeploymentSpec:
    """What a deployment put now must also meet, beyond `validate` (which every stored spec read
    back meets too: a rule added later refuses new puts, never a spec stored before it)."""
    check_numbers(spec)
    check_serving(spec)
    b = spec.batching
    if b.max_queue_delay_us / 1e3 >= spec.attempt_timeout_ms:
        # an attempt's timeout runs from when it queues: a request alone would always time out
        raise InvalidArgument(f"batching.max_queue_delay_us ({b.max_queue_delay_us} µs) must be below "
                              f"attempt_timeout_ms ({spec.attempt_timeout_ms:g} ms): a request waiting out the "
                              f"delay alone would time out on every node")
    for where, precision in _precisions(spec):
        if precision.upper() not in ("", *PRECISIONS):
            raise InvalidArgument(f"deployment field '{spec.model}.{where}' must be one of {list(PRECISIONS)} "
                                  f"(or empty), got {precision!r}")
    return spec


def _precisions(spec: DeploymentSpec) -> list[tuple[str, str]]:
    """(field, value) of each precision a deployment names (a name no variant can hold would
    otherwise read as a precision no version has yet: FAILED_PRECONDITION, not INVALID_ARGUMENT)."""
    return [("precision.precision", spec.precision.precision), ("joint.edge_precision", spec.joint.edge_precision),
            ("joint.cloud_precision", spec.joint.cloud_precision),
            *((f"ensemble[{i}].precision", step.precision) for i, step in enumerate(spec.ensemble))]


def from_dict(data: Any) -> DeploymentSpec:
    return validate(_build(DeploymentSpec, data, data.get("model", "?") if isinstance(data, dict) else "?"))


def from_json(text: str) -> DeploymentSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"deployment spec is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("deployment spec is nested too deeply") from None
    return from_dict(data)


def to_json(spec: DeploymentSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def shapes_fit(first: tuple[int, ...], second: tuple[int, ...], from_dim: int = 1) -> bool:
    """Same rank and, from dimension `from_dim` (by default past the batch dimension), the same
    size wherever both are fixed (-1: any)."""
    return len(first) == len(second) and all(a == b or -1 in (a, b)
                                             for a, b in zip(first[from_dim:], second[from_dim:]))


def joint_mismatches(edge_outputs: dict[str, tuple[int, ...]], cloud_outputs: dict[str, tuple[int, ...]]) -> list[str]:
    """Why the cloud model cannot answer the edge model's rows (outputs by name -> shape): each
    edge output it lacks or has with another non-batch shape."""
    problems = []
    for name, shape in edge_outputs.items():
        if name not in cloud_outputs:
            problems.append(f"it has no output '{name}'")
        elif not shapes_fit(shape, cloud_outputs[name]):
            problems.append(f"its output '{name}' has shape {list(cloud_outputs[name])}, the edge's {list(shape)}")
    return problems
