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
        # model -> (its variants, expiry, the variants of each version asked for, picked once)
        self._variants: dict[str, tuple[list[ModelVariant], float, dict[str, list[ModelVariant]]]] = {}
        self._deployments: dict[str, tuple[DeploymentSpec, float]] = {}

    def forget(self, model: str = "") -> None:
        for cache in (self._variants, self._deployments):
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
        """Every precision variant of one version (when `version` is empty: the deployment's
        stable version, else the latest)."""
        if not version:
            version = (await self.deployment(model)).rollout.stable
        variants, _, chosen = await self._entry(model)
        if version not in chosen:
            chosen[version] = _pick_version(variants, model, version)
        return chosen[version]

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
    if not variants:
        raise ModelNotFound(model, version)
    version = version or max((v.version for v in variants), key=version_key)
    chosen = [v for v in variants if v.version == version]
    if not chosen:
        raise ModelNotFound(model, version)
    return chosen
