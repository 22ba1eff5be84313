"""An ensemble's tensors as the versions its steps run type them: the step writing a tensor (or,
for an ensemble input, the first reading it) and every step reading it must agree on its datatype
and its shape (-1 fits any size: a batching model's batch dimension is -1; one that does not batch
names a real first size), as Triton checks an ensemble it loads (pure functions)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.deployment import DeploymentSpec, shapes_fit
from services.common.ensemble_plan import ensemble_plan
from services.common.model_spec import ModelVariant, TensorSpec


@dataclass(frozen=True)
class StepTensors:
    """The tensors of the version of its model one ensemble step runs."""

    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, variant: ModelVariant) -> StepTensors:
        return cls(variant.name, variant.version, tuple(variant.inputs), tuple(variant.outputs))


@dataclass(frozen=True)
class _Seen:
    """One ensemble tensor as one step's model types it."""

    spec: TensorSpec
    step: StepTensors
    side: str  # input | output

    def __str__(self) -> str:
        return f"model '{self.step.model}' version {self.step.version} ({self.side} '{self.spec.name}')"


def _disagreement(first: _Seen, then: _Seen) -> str | None:
    """What two steps' models see differently of one tensor, in Triton's words; None when they agree."""
    if first.spec.datatype != then.spec.datatype:
        kind, a, b = "datatype", first.spec.datatype, then.spec.datatype
    elif not shapes_fit(first.spec.shape, then.spec.shape, from_dim=0):
        kind, a, b = "shape", list(first.spec.shape), list(then.spec.shape)
    else:
        return None
    return f"inconsistent {kind}: {a} is inferred from {first} while {b} is inferred from {then}"


def tensor_inconsistency(spec: DeploymentSpec, steps: Sequence[StepTensors | None]) -> str | None:
    """The first ensemble tensor of `spec` that a step reading it sees otherwise than the step writing
    it (an ensemble input: the first step reading it), naming the ensemble, the tensor, both models
    with their versions and what each sees; None when all agree. `steps`: per step, the tensors of
    the version it runs (None: not known, e.g. a nested ensemble; a model tensor a step maps that
    its model lacks is the name check's to refuse)."""
    seen: dict[str, _Seen] = {}
    for known, (reads, writes) in zip(steps, ensemble_plan(spec).maps):
        if known is None:
            continue
        for side, pairs, specs in (("input", reads, known.inputs), ("output", writes, known.outputs)):
            by_name = {t.name: t for t in specs}
            for model_tensor, tensor in pairs:
                if model_tensor not in by_name:
                    continue
                now = _Seen(by_name[model_tensor], known, side)
                if tensor not in seen:
                    seen[tensor] = now
                elif problem := _disagreement(seen[tensor], now):
                    return f"ensemble '{spec.model}' tensor '{tensor}': {problem}"
    return None


def inconsistency_over(spec: DeploymentSpec, runs: Sequence[Sequence[StepTensors | None]]) -> str | None:
    """`tensor_inconsistency` of the first way the ensemble's requests may go that has one (`runs`:
    per step, the tensors of each version it may run: its stable one, its model's canary)."""
    return next(filter(None, (tensor_inconsistency(spec, way) for way in itertools.product(*runs))), None)
