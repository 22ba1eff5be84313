"""One request's view of its models and ensemble steps: each step's model read from the catalog
once, each step's version and each model's variant worked out once, however often asked; what
scope an ensemble's kept answers hold for follows from them."""
from __future__ import annotations

import functools
import random

from services.common.deployment import DeploymentSpec, EnsembleStep
from services.common.errors import ModelNotFound
from services.common.model_spec import ModelVariant
from services.common.served import canary_drawn, step_stable_version
from services.coordinator import ensemble
from services.coordinator.catalog import Catalog
from services.coordinator.precision import PrecisionPolicy, choose_variant, request_policy


class StepResolver:
    """The catalog's answers for one request (an ensemble's batch-size check, cache scope, run and
    its steps' own requests share them): a deployment or a model's variants are read once, a
    step's stable version and a model's variant worked out once; errors are not kept (the request
    fails with them)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._deployments: dict[str, DeploymentSpec] = {}
        self._all_variants: dict[str, list[ModelVariant]] = {}
        self._versions: dict[tuple[str, str], list[ModelVariant]] = {}  # by (model, version asked for)
        self._stable: dict[EnsembleStep, str] = {}
        self._variants: dict[tuple[str, str, int], ModelVariant] = {}

    async def deployment(self, model: str) -> DeploymentSpec:
        if model not in self._deployments:
            self._deployments[model] = await self.catalog.deployment(model)
        return self._deployments[model]

    async def all_variants(self, model: str) -> list[ModelVariant]:
        if model not in self._all_variants:
            self._all_variants[model] = await self.catalog.all_variants(model)
        return self._all_variants[model]

    async def variants(self, model: str, version: str = "") -> list[ModelVariant]:
        """Every precision variant of one version of the model (`Catalog.variants`)."""
        if (model, version) not in self._versions:
            self._versions[model, version] = await self.catalog.variants(model, version)
        return self._versions[model, version]

    async def stable_version(self, step: EnsembleStep) -> str:
        """The version of its model an ensemble step runs apart from a canary's share:
        `served.step_stable_version` (the one it names, its model's pinned stable one, else the
        newest with the step's precision and the deployment's whose tensors fit the step's
        mapping); a step over another ensemble: the one it names."""
        if step not in self._stable:
            deployed = await self.deployment(step.model)
            self._stable[step] = step.version if deployed.ensemble else \
                step_stable_version(step, deployed, await self.all_variants(step.model))
        return self._stable[step]

    async def drawn_version(self, step: EnsembleStep) -> str:
        """The version one run of an ensemble step goes to, as `served.step_version` says: its
        model's canary for the canary's share, else its stable version (`stable_version`, worked
        out once per request)."""
        deployed = await self.deployment(step.model)
        if deployed.ensemble:
            return step.version
        if canary_drawn(step, deployed, random.random()):
            return deployed.rollout.canary
        return await self.stable_version(step)

    async def model_variant(self, name: str, version: str = "", depth: int = 0) -> ModelVariant:
        """The model's default variant; for an ensemble, what its steps make of it (`depth`: how
        many ensembles lead to this one; FAILED_PRECONDITION past ensemble.MAX_DEPTH, a cycle)."""
        key = (name, version, depth)
        if key not in self._variants:
            self._variants[key] = await self._model_variant(name, version, depth)
        return self._variants[key]

    async def _model_variant(self, name: str, version: str, depth: int) -> ModelVariant:
        try:
            return choose_variant(await self.variants(name, version), PrecisionPolicy(), "")
        except ModelNotFound:
            spec = await self.deployment(name)
            if not spec.ensemble or version not in ("", ensemble.VERSION):
                raise
            return await self.ensemble_variant(spec, depth)

    async def ensemble_variant(self, spec: DeploymentSpec, depth: int) -> ModelVariant:
        """What an ensemble's steps (the version each runs apart from canaries) make of it."""
        ensemble.check_depth(spec, depth)
        return await ensemble.variant(spec, functools.partial(self.model_variant, depth=depth + 1),
                                      self.stable_version)

    async def cache_scope(self, spec: DeploymentSpec, depth: int) -> str | None:
        """What decides an ensemble's answer besides its inputs: the steps as applied, the version
        each resolves to now and the precision policy it is served under (a step without its own
        precision takes its model's deployment's; a nested ensemble: its own scope), so a new
        version or precision of a step's model never meets answers of the old one. None (not
        cached) while a step that names no version has a canary: its requests go to either version
        at random, a kept answer would be one version's for every request, and still served after
        the canary is rolled back."""
        ensemble.check_depth(spec, depth)
        scopes = []
        for step in spec.ensemble:
            deployed = await self.deployment(step.model)
            if deployed.ensemble:
                nested = await self.cache_scope(deployed, depth + 1)
                if nested is None:
                    return None
                scopes.append(nested)
                continue
            if not step.version and deployed.rollout.canary and deployed.rollout.canary_percent > 0:
                return None
            version = await self.stable_version(step)
            policy = request_policy({"precision": step.precision} if step.precision else {}, deployed)
            scopes.append(f"{version}/{policy}")
        return f"{spec.model}/ensemble/{spec.ensemble!r}/{scopes}"
