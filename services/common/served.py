"""Which version of a model a deployment serves to requests that name none, and which one an
ensemble step over it runs: one rule for the registry, the coordinator, the runtimes and the CLI
(pure functions)."""
from __future__ import annotations

from collections.abc import Mapping

from services.common.deployment import DeploymentSpec, EnsembleStep, rollout_version
from services.common.ensemble_plan import step_mapping_problem, tensor_map
from services.common.errors import FailedPrecondition, ModelNotFound
from services.common.model_spec import ModelVariant, version_key

STEP_PRECISION = "the step's precision"  # who asks, in `latest_version`'s refusal


def needed_precisions(spec: DeploymentSpec) -> dict[str, str]:
    """The precisions each version the deployment serves must hold a variant in, by the field
    asking for it ('<model>.precision.precision', '<model>.joint.edge_precision')."""
    asked = (("precision.precision", spec.precision.precision), ("joint.edge_precision", spec.joint.edge_precision))
    return {f"{spec.model}.{where}": precision.upper() for where, precision in asked if precision}


def latest_version(spec: DeploymentSpec, variants: list[ModelVariant], also: dict[str, str] | None = None) -> str:
    """The latest version of the deployment's model (`variants`: its variants): the newest that
    holds a variant in every precision the deployment needs (`needed_precisions`) and those in
    `also` (precision by who asks for it besides: an ensemble step). Variants are pushed one at a
    time, so a version whose INT8 comes after its FP32 is not the latest of an INT8 deployment until
    it does. ModelNotFound without variants; FailedPrecondition, naming what is needed, when no
    version holds them all."""
    return complete_versions(spec, variants, also)[0]


def complete_versions(spec: DeploymentSpec, variants: list[ModelVariant], also: dict[str, str] | None = None,
                      ) -> list[str]:
    """The versions holding every precision `latest_version` asks for, newest first; its errors
    when there are none."""
    if not variants:
        raise ModelNotFound(spec.model)
    needed, also = needed_precisions(spec), also or {}
    held: dict[str, set[str]] = {}
    for v in variants:
        held.setdefault(v.version, set()).add(v.precision)
    complete = [version for version, precisions in held.items()
                if {*needed.values(), *also.values()} <= precisions]
    if not complete:
        asked = [f"{precision} ('{where}')" for where, precision in needed.items()]
        asked += [f"{precision} ({who})" for who, precision in also.items()]
        who = "asked for" if also else "its deployment asks for"
        raise FailedPrecondition(f"no version of model '{spec.model}' has a variant in every precision {who}: "
                                 + ", ".join(asked))
    return sorted(complete, key=version_key, reverse=True)


def served_version(spec: DeploymentSpec, variants: list[ModelVariant]) -> str:
    """The version serving requests that name none, apart from a canary's share: the pinned
    stable one, else the latest (`latest_version`). Every place resolving it calls this (an
    ensemble step: `step_stable_version`)."""
    return spec.rollout.stable or latest_version(spec, variants)


def step_stable_version(step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant]) -> str:
    """The version an ensemble step's requests go to apart from its model's canary's share
    (`deployed`: its model's deployment, else the defaults; `variants`: its model's): the one it
    names, else its model's pinned stable one (the registry refuses a pin lacking the step's
    precision or a tensor it maps), else `step_latest_version`."""
    return step.version or deployed.rollout.stable or step_latest_version(step, deployed, variants)


def step_latest_version(step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant]) -> str:
    """The version an ensemble step over an unpinned model runs: the newest holding the step's
    precision and its deployment's (`latest_version`; a version pushed without it is not run by the
    step until it has it) whose tensors fit the step's mapping (a version renaming one is passed
    over: `step_passed_over`); the newest holding the precisions when none fits (its requests then
    fail naming the tensor, as the registry's checks of puts do). Names alone are judged: a version
    keeping them but retyping a tensor is run, as whether it fits depends on the versions the other
    steps run (`ensemble_tensors`, which the registry judges puts by)."""
    held = complete_versions(deployed, variants, _step_precision(step))
    return next((version for version in held if not tensor_problem_over(step, [version], variants)), held[0])


def step_passed_over(step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant],
                     version: str) -> tuple[str, str] | None:
    """(the version the step runs, the tensor problem) when `version` holds the precisions it needs,
    is newer than the version it runs and is passed over for a tensor its mapping needs
    (`step_latest_version`); None when the step runs it, names a version or its model's deployment
    pins one, or `version` lacks a precision."""
    if step.version or deployed.rollout.stable:
        return None
    held = _or_none(complete_versions, deployed, variants, _step_precision(step)) or []
    running = _or_none(step_latest_version, step, deployed, variants)
    if version not in held or running is None or version_key(version) <= version_key(running):
        return None
    problem = tensor_problem_over(step, [version], variants)
    return (running, problem) if problem else None


def passed_over_notes(ensemble: DeploymentSpec, deployed: DeploymentSpec, variants: list[ModelVariant],
                      versions: list[str]) -> list[str]:
    """`passed_over_note` of each step of `ensemble` over the model of `deployed` (`variants`: its
    variants)."""
    return [note for i, step in enumerate(ensemble.ensemble) if step.model == deployed.model
            and (note := passed_over_note(ensemble.model, i, step, deployed, variants, versions))]


def passed_over_note(ensemble: str, i: int, step: EnsembleStep, deployed: DeploymentSpec,
                     variants: list[ModelVariant], versions: list[str]) -> str | None:
    """What to say of step `i` of `ensemble` when it passes one of `versions` over for a tensor it
    maps (`step_passed_over`; the first such of `versions`): the ensemble, step, model, the version
    it runs, the version passed over and the tensor; None when it passes none over."""
    for version in versions:
        if found := step_passed_over(step, deployed, variants, version):
            running, problem = found
            return (f"ensemble '{ensemble}' step {i} ({step.model}) runs version {running}, "
                    f"passing over version {version}: {problem}")
    return None


def newer_versions(variants: list[ModelVariant], than: str) -> list[str]:
    """The versions among `variants` newer than `than`, newest first."""
    return sorted({v.version for v in variants if version_key(v.version) > version_key(than)}, key=version_key,
                  reverse=True)


def steps_run(spec: DeploymentSpec, variants: Mapping[str, list[ModelVariant]],
              deployments: Mapping[str, DeploymentSpec]) -> list[str]:
    """The version each of an ensemble's steps runs apart from a canary's share
    (`step_stable_version` over its model's `variants` and deployment, by model); '' where the
    model has no variants (a nested ensemble, one no longer held) or no version serves."""
    versions = []
    for step in spec.ensemble:
        held = variants.get(step.model, [])
        deployed = deployments.get(step.model) or DeploymentSpec(model=step.model)
        versions.append((_or_none(step_stable_version, step, deployed, held) or "") if held else step.version)
    return versions


def _step_precision(step: EnsembleStep) -> dict[str, str] | None:
    """The precision a step asks for, as `latest_version` takes it (`also`)."""
    return {STEP_PRECISION: step.precision.upper()} if step.precision else None


def step_version(step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant], draw: float) -> str:
    """The version one request of an ensemble step goes to, for a uniform `draw` in [0, 1): the one
    it names; else its model's canary for the canary's share (`canary_drawn`), as for any request
    naming no version; else `step_stable_version`."""
    if canary_drawn(step, deployed, draw):
        return deployed.rollout.canary
    return step_stable_version(step, deployed, variants)


def canary_drawn(step: EnsembleStep, deployed: DeploymentSpec, draw: float) -> bool:
    """Whether one request of a step naming no version goes to its model's canary, for a uniform
    `draw` in [0, 1) (`rollout_version`)."""
    rollout = deployed.rollout
    return not step.version and bool(rollout.canary) and rollout_version(rollout, draw) == rollout.canary


def step_versions(step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant]) -> list[str]:
    """Every version an ensemble step's requests go to (`step_version` for any draw): the one it
    names, else its `step_stable_version` and its model's canary."""
    canary = "" if step.version else deployed.rollout.canary
    return [step_stable_version(step, deployed, variants)] + ([canary] if canary else [])


def step_precision_problem(step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant]) -> str | None:
    """Why an ensemble step's requests would fail for the precision it asks for: no version holds it
    and the deployment's precisions, or a version they go to (`step_versions`: a pinned stable one,
    a canary, the one the step names) has no variant in it; None when each has it, or it asks for
    none."""
    if not step.precision:
        return None
    try:
        versions = step_versions(step, deployed, variants)
    except FailedPrecondition as exc:
        return exc.message
    return precision_problem_over(step, versions, variants)


def precision_problem_over(step: EnsembleStep, versions: list[str], variants: list[ModelVariant]) -> str | None:
    """`step_precision_problem` over `versions` (the step's `step_versions`, worked out already)."""
    precision = step.precision.upper()
    for version in versions if precision else ():
        if problem := precision_lacking(step.model, version, precision, variants, STEP_PRECISION):
            return problem
    return None


def precision_lacking(model: str, version: str, precision: str, variants: list[ModelVariant], asker: str,
                      role: str = "") -> str | None:
    """Why `version` of `model` (`variants`: its variants; `role`: what it is to a deployment, said
    beside it) cannot serve what `asker` asks for: it has no variant in `precision`; None when it has."""
    held = sorted({v.precision for v in variants if v.version == version})
    if precision in held:
        return None
    return (f"model '{model}' version {version}{f' ({role})' if role else ''} has no {precision} variant, which "
            f"{asker} asks for (its variants: {', '.join(held) or 'none'})")


def step_tensor_problem(step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant]) -> str | None:
    """Why an ensemble step's requests would fail for the tensors it maps: a variant of a version
    they go to (`step_versions`; of the step's precision when it asks for one) lacks a model input
    or output the step reads or writes; None when each has them, or no version is run (the
    precision's problem, `step_precision_problem`)."""
    return tensor_problem_over(step, _or_none(step_versions, step, deployed, variants) or [], variants)


def tensor_problem_over(step: EnsembleStep, versions: list[str], variants: list[ModelVariant]) -> str | None:
    """`step_tensor_problem` over `versions` (the step's `step_versions`, worked out already)."""
    where = f"ensemble step ({step.model})"
    reads, writes = tensor_map(step.inputs, where), tensor_map(step.outputs, where)
    precision = step.precision.upper()
    for version in versions:
        for v in variants:
            if v.version == version and precision in ("", v.precision):
                if problem := step_mapping_problem(reads, writes, [t.name for t in v.inputs],
                                                   [t.name for t in v.outputs], step.model, version):
                    return problem
    return None


def versions_in_use(model: str, specs: list[DeploymentSpec], variants: list[ModelVariant]) -> dict[str, str]:
    """The versions of `model` requests go to (`specs`: every deployment; `variants`: the model's),
    each with why: the stable version its own deployment pins or serves as the latest, and its
    canary; the versions ensemble steps over it run (`step_versions`); the version deployments ask
    of it as their joint cloud model (the one they name, else the one it serves). A model without
    a deployment of its own is in use only through others'."""
    deployed = {s.model: s for s in specs}
    own = deployed.get(model, DeploymentSpec(model))
    used: dict[str, str] = {}
    if model in deployed:
        pinned = "pins it as the stable version" if own.rollout.stable else \
            "serves it as the latest version (pin another stable version first)"
        used[_or_none(served_version, own, variants)] = f"its deployment {pinned}"
        used[own.rollout.canary] = "its deployment's canary"
    for spec in specs:
        for i, step in enumerate(spec.ensemble):
            if step.model == model:
                for version in _or_none(step_versions, step, own, variants) or []:
                    used.setdefault(version, f"ensemble '{spec.model}' step {i} runs it")
        j = spec.joint
        joint = j.mode != "off" or j.cloud_model or j.cloud_version
        if joint and not spec.ensemble and (j.cloud_model or spec.model) == model:
            used.setdefault(j.cloud_version or _or_none(served_version, own, variants),
                            f"the deployment of model '{spec.model}' runs it as its joint cloud model")
    return {version: why for version, why in used.items() if version}


def models_in_use(specs: list[DeploymentSpec]) -> set[str]:
    """The models deployments (`specs`: every one) send requests to: each one's own, its ensemble
    steps', its joint cloud model; `versions_in_use` finds no version of any other model."""
    models = {spec.model for spec in specs} | {spec.joint.cloud_model for spec in specs if spec.joint.cloud_model}
    return models | {step.model for spec in specs for step in spec.ensemble}


def _or_none(rule, *args):
    """`rule(*args)`, None where no version is served (FailedPrecondition, ModelNotFound)."""
    try:
        return rule(*args)
    except (FailedPrecondition, ModelNotFound):
        return None
