"""Cached registry lookups for the coordinator: variants of a model version and deployments."""
from __future__ import annotations

import time

from services.common import deployment
from services.common.deployment import DeploymentSpec
from services.common.errors import ModelNotFound, NotFound
from services.common.model_spec import ModelVariant, version_key
from services.common.registry_client import RegistryClient


class Catalog:
    """Registry answers reused for `ttl_s`; `forget` drops a model's entries on events."""

    def __init__(self, registry: RegistryClient, ttl_s: float):
        self.registry = registry
        self.ttl_s = ttl_s
        self._variants: dict[str, tuple[list[ModelVariant], float]] = {}
        self._deployments: dict[str, tuple[DeploymentSpec, float]] = {}
        self._chosen: dict[tuple[str, str], tuple[list[ModelVariant], float]] = {}

    def forget(self, model: str = "") -> None:
        for cache in (self._variants, self._deployments):
            for key in [k for k in cache if not model or k == model]:
                del cache[key]
        for key in [k for k in self._chosen if not model or k[0] == model]:
            del self._chosen[key]

    async def all_variants(self, model: str) -> list[ModelVariant]:
        cached = self._variants.get(model)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        variants = await self.registry.list(model)
        self._variants[model] = (variants, time.monotonic() + self.ttl_s)
        return variants

    async def variants(self, model: str, version: str = "") -> list[ModelVariant]:
        """Every precision variant of one version (the latest when `version` is empty)."""
        cached = self._chosen.get((model, version))
        if cached and cached[1] > time.monotonic():
            return cached[0]
        chosen = await self._choose(model, version)
        self._chosen[(model, version)] = (chosen, self._variants[model][1])
        return chosen

    async def _choose(self, model: str, version: str) -> list[ModelVariant]:
        variants = await self.all_variants(model)
        if not variants:
            raise ModelNotFound(model, version)
        version = version or max((v.version for v in variants), key=version_key)
        chosen = [v for v in variants if v.version == version]
        if not chosen:
            raise ModelNotFound(model, version)
        return chosen

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
