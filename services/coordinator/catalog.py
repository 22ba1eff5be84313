"""Cached registry lookups for the coordinator: variants of a model version and deployments."""
from __future__ import annotations

import time

from services.common import deployment
from services.common.deployment import DeploymentSpec
from services.common.errors import ModelNotFound, NotFound
from services.common.model_spec import ModelVariant
from services.common.registry_client import RegistryClient
from services.common.served import served_version


class Catalog:
    """Registry answers reused for `ttl_s`; `forget` drops a model's entries on events."""

    def __init__(self, registry: RegistryClient, ttl_s: float):
        self.registry = registry
        self.ttl_s = ttl_s
        # model -> (its variants, expiry, the variants of each version asked for, picked once)
        self._variants: dict[str, tuple[list[ModelVariant], float, dict[str, list[ModelVariant]]]] = {}
        self._deployments: dict[str, tuple[DeploymentSpec, float]] = {}
        # model -> (the deployment and variants its served version was worked out from, that version)
        self._served: dict[str, tuple[DeploymentSpec, list[ModelVariant], str]] = {}

    def forget(self, model: str = "") -> None:
        for cache in (self._variants, self._deployments, self._served):
            for key in [k for k in cache if not model or k == model]:
                del cache[key]

    async def _entry(self, model: str) -> tuple[list[ModelVariant], float, dict[str, list[ModelVariant]]]:
        cached = self._variants.get(model)
        if cached and cached[1] > time.monotonic():
            return cached
        entry = self._variants[model] = (await self.registry.list(model), time.monotonic() + self.ttl_s, {})
        return entry

    async def all_variants(self, model: str) -> list[ModelVariant]:
        return (await self._entry(model))[0]

    async def variants(self, model: str, version: str = "") -> list[ModelVariant]:
        """Every precision variant of one version (when `version` is empty: the one the model's
        deployment serves, `served.served_version`)."""
        variants, _, chosen = await self._entry(model)
        if not version:
            version = await self._served_version(model, variants)
        if version not in chosen:
            chosen[version] = _pick_version(variants, model, version)
        return chosen[version]

    async def _served_version(self, model: str, variants: list[ModelVariant]) -> str:
        """`served.served_version` of the model, worked out again only when its deployment or
        its variants were read again (requests naming no version ask for it each)."""
        spec = await self.deployment(model)
        cached = self._served.get(model)
        if cached is None or cached[0] is not spec or cached[1] is not variants:
            cached = self._served[model] = (spec, variants, served_version(spec, variants))
        return cached[2]

    async def deployment(self, model: str) -> DeploymentSpec:
        """The model's deployment spec, or the defaults when none was applied."""
        cached = self._deployments.get(model)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        try:
            spec = await self.registry.get_deployment(model)
        except NotFound:
            spec = deployment.validate(DeploymentSpec(model=model))
        self._deployments[model] = (spec, time.monotonic() + self.ttl_s)
        return spec


def _pick_version(variants: list[ModelVariant], model: str, version: str) -> list[ModelVariant]:
    chosen = [v for v in variants if v.version == version]
    if not chosen:
        raise ModelNotFound(model, version)
    return chosen
