"""Which version of a model a deployment serves to requests that name none: one rule for the
registry, the coordinator, the runtimes and the CLI (pure functions)."""
from __future__ import annotations

from services.common.deployment import DeploymentSpec, EnsembleStep
from services.common.errors import FailedPrecondition, ModelNotFound
from services.common.model_spec import ModelVariant, version_key


def needed_precisions(spec: DeploymentSpec) -> dict[str, str]:
    """The precisions each version the deployment serves must hold a variant in, by the field
    asking for it ('<model>.precision.precision', '<model>.joint.edge_precision')."""
    asked = (("precision.precision", spec.precision.precision), ("joint.edge_precision", spec.joint.edge_precision))
    return {f"{spec.model}.{where}": precision.upper() for where, precision in asked if precision}


def latest_version(spec: DeploymentSpec, variants: list[ModelVariant]) -> str:
    """The latest version of the deployment's model (`variants`: its variants): the newest that
    holds a variant in every precision the deployment needs (`needed_precisions`). Variants are
    pushed one at a time, so a version whose INT8 comes after its FP32 is not the latest of an
    INT8 deployment until it does. ModelNotFound without variants; FailedPrecondition, naming what
    is needed, when no version holds them all."""
    if not variants:
        raise ModelNotFound(spec.model)
    needed = needed_precisions(spec)
    held: dict[str, set[str]] = {}
    for v in variants:
        held.setdefault(v.version, set()).add(v.precision)
    complete = [version for version, precisions in held.items() if set(needed.values()) <= precisions]
    if not complete:
        asked = ", ".join(f"{precision} ('{where}')" for where, precision in needed.items())
        raise FailedPrecondition(f"no version of model '{spec.model}' has a variant in every precision its "
                                 f"deployment asks for: {asked}")
    return max(complete, key=version_key)


def served_version(spec: DeploymentSpec, variants: list[ModelVariant]) -> str:
    """The version serving requests that name none, apart from a canary's share: the pinned
    stable one, else the latest (`latest_version`). Every place resolving it calls this."""
    return spec.rollout.stable or latest_version(spec, variants)


def step_versions(step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant]) -> list[str]:
    """The versions an ensemble step's requests go to (`deployed`: its model's deployment, else
    the defaults; `variants`: its model's): the one it names, else the one that deployment serves
    (`served_version`) and its canary."""
    if step.version:
        return [step.version]
    return [served_version(deployed, variants)] + ([deployed.rollout.canary] if deployed.rollout.canary else [])


def step_precision_problem(step: EnsembleStep, deployed: DeploymentSpec, variants: list[ModelVariant]) -> str | None:
    """Why an ensemble step's requests would fail for the precision it asks for: a version they go
    to (`step_versions`) has no variant in it; None when each has it, or it asks for none."""
    precision = step.precision.upper()
    for version in step_versions(step, deployed, variants) if precision else []:
        held = sorted({v.precision for v in variants if v.version == version})
        if precision not in held:
            return (f"model '{step.model}' version {version} has no {precision} variant, which the step's precision "
                    f"asks for (its variants: {', '.join(held) or 'none'})")
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


def _or_none(rule, *args):
    """`rule(*args)`, None where no version is served (FailedPrecondition, ModelNotFound)."""
    try:
        return rule(*args)
    except (FailedPrecondition, ModelNotFound):
        return None
