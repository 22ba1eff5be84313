"""An ensemble deployment's steps read as a plan: the tensors each step reads and writes, the
ensemble's inputs and outputs, and the checks of its steps' mappings and of ensembles nesting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    from services.common.deployment import DeploymentSpec


def tensor_map(entries: tuple[str, ...], where: str) -> list[tuple[str, str]]:
    """"a=b" entries -> [(a, b)], or INVALID_ARGUMENT naming the entry."""
    pairs = []
    for entry in entries:
        left, eq, right = entry.partition("=")
        if not eq or not left.strip() or not right.strip():
            raise InvalidArgument(f"{where}: '{entry}' must read <model tensor>=<ensemble tensor>")
        pairs.append((left.strip(), right.strip()))
    return pairs


@dataclass(frozen=True)
class EnsemblePlan:
    """An ensemble's steps read once: its inputs (the tensors no step produces, in the order first
    used), its outputs (those no later step consumes, in the order produced) and per step its
    (model tensor, ensemble tensor) reads and writes."""

    inputs: list[str]
    outputs: list[str]
    maps: list[tuple[list[tuple[str, str]], list[tuple[str, str]]]]


def ensemble_plan(spec: DeploymentSpec) -> EnsemblePlan:
    """The ensemble's plan, or INVALID_ARGUMENT for a step that uses itself, reads a tensor
    produced later, or a tensor produced twice."""
    produced: dict[str, int] = {}
    inputs: list[str] = []
    consumed: set[str] = set()
    maps = []
    for i, step in enumerate(spec.ensemble):
        where = f"ensemble step {i} ({step.model})"
        if not step.model or step.model == spec.model:
            raise InvalidArgument(f"{where}: a step names another model than the ensemble '{spec.model}'")
        if step.tier not in ("", "edge", "cloud"):
            raise InvalidArgument(f"{where}: tier must be edge, cloud or empty, got {step.tier!r}")
        reads, writes = tensor_map(step.inputs, where), tensor_map(step.outputs, where)
        if not reads or not writes:
            raise InvalidArgument(f"{where}: a step maps at least one input and one output")
        maps.append((reads, writes))
        for _, tensor in reads:
            consumed.add(tensor)
            if tensor not in produced and tensor not in inputs:
                inputs.append(tensor)
        for _, tensor in writes:
            if tensor in produced or tensor in inputs:
                raise InvalidArgument(f"{where}: tensor '{tensor}' is produced twice (or is an ensemble input)")
            produced[tensor] = i
    return EnsemblePlan(inputs, [t for t in produced if t not in consumed], maps)


def ensemble_interface(spec: DeploymentSpec) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of an ensemble (see EnsemblePlan)."""
    plan = ensemble_plan(spec)
    return plan.inputs, plan.outputs


def ensemble_cycle(model: str, ensembles: dict[str, DeploymentSpec]) -> list[str] | None:
    """A chain of ensemble steps leading from ensemble `model` back to itself (the ensembles by
    name, `model`'s among them), or None."""
    def walk(name: str, path: list[str]) -> list[str] | None:
        for step in ensembles[name].ensemble:
            if step.model == model:
                return [*path, model]
            if step.model in ensembles and step.model not in path:
                if found := walk(step.model, [*path, step.model]):
                    return found
        return None
    return walk(model, [model])


def step_mapping_problem(reads: list[tuple[str, str]], writes: list[tuple[str, str]], inputs: list[str],
                         outputs: list[str], model: str, version: str = "") -> str | None:
    """What is wrong with a step's tensor mapping against its model's `inputs` and `outputs`
    (a model tensor it reads or writes that the model, named with `version` when given, does
    not have), or None."""
    who = f"model '{model}'" + (f" version {version}" if version else "")
    for model_tensor, _ in reads:
        if model_tensor not in inputs:
            return f"{who} has no input '{model_tensor}' (inputs: {sorted(inputs)})"
    for model_tensor, _ in writes:
        if model_tensor not in outputs:
            return f"{who} has no output '{model_tensor}' (outputs: {sorted(outputs)})"
    return None
