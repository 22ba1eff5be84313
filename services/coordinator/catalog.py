"""Cached registry lookups for the coordinator: variants of a model version and deployments, kept
past their lifetime while the registry is unreachable or slow (`stale_reads`), changed by events."""
from __future__ import annotations

from services.common import deployment, events
from services.common.deployment import DeploymentSpec
from services.common.errors import ModelNotFound, NotFound
from services.common.model_spec import ModelVariant
from services.common.registry_client import RegistryClient
from services.common.served import served_version
from services.coordinator.registry_outage import Outage
from services.coordinator.stale_reads import StaleReads

REGISTRY_TIMEOUT_S = 2.0


class Catalog:
    """Registry answers reused for `ttl_s` and refreshed in the background after it; each read waits
    at most `timeout_s`, and a registry that does not answer leaves the last answers in force
    (`outage` says since when). Events change a model's entries (`apply_event`, `forget`)."""

    def __init__(self, registry: RegistryClient, ttl_s: float, timeout_s: float = REGISTRY_TIMEOUT_S):
        self.registry = registry
        self.ttl_s = ttl_s
        self.outage = Outage(getattr(registry, "target", "(unnamed)"))
        self._variants = StaleReads(self._read_variants, ttl_s, timeout_s, self.outage, lambda m: f"model '{m}'")
        self._deployments = StaleReads(self._read_deployment, ttl_s, timeout_s, self.outage,
                                       lambda m: f"the deployment of model '{m}'")
        # model -> (the variants read, the variants of each version asked for, picked once)
        self._chosen: dict[str, tuple[list[ModelVariant], dict[str, list[ModelVariant]]]] = {}
        # model -> (the deployment and variants its served version was worked out from, that version)
        self._served: dict[str, tuple[DeploymentSpec, list[ModelVariant], str]] = {}

    def forget(self, model: str = "") -> None:
        """Something of `model` (every model when empty) changed: its answers are read again before
        their next use, the last known ones kept for while the registry does not answer."""
        self._variants.change(model)
        self._deployments.change(model)

    def apply_event(self, subject: str, payload: dict) -> None:
        """A registry event: what it says changed applies at once, whether the registry answers or
        not (a deleted version is gone, a deleted deployment leaves the defaults); the rest is read
        again (`forget`)."""
        model = payload.get("name") or payload.get("model", "")
        if subject == events.MODEL_DELETED and model:
            self._deleted(model, payload.get("version", ""), payload.get("precisions") or [])
        elif subject == events.DEPLOYMENT_UPDATED and model and payload.get("deleted"):
            self._variants.change(model)
            self._deployments.change(model, _defaults(model))
        else:
            self.forget(model)

    def _deleted(self, model: str, version: str, precisions: list[str]) -> None:
        known = self._variants.known(model)
        if known is not None:
            known = [v for v in known if not (v.version == version and (not precisions or v.precision in precisions))]
        self._variants.change(model, known)
        self._deployments.change(model)

    async def close(self) -> None:
        """Cancel the reads in the background."""
        await self._variants.close()
        await self._deployments.close()

    async def all_variants(self, model: str) -> list[ModelVariant]:
        return await self._variants.get(model)

    async def variants(self, model: str, version: str = "") -> list[ModelVariant]:
        """Every precision variant of one version (when `version` is empty: the one the model's
        deployment serves, `served.served_version`)."""
        variants = await self._variants.get(model)
        if not version:
            version = await self._served_version(model, variants)
        chosen = self._chosen.get(model)
        if chosen is None or chosen[0] is not variants:
            chosen = self._chosen[model] = (variants, {})
        if version not in chosen[1]:
            chosen[1][version] = _pick_version(variants, model, version)
        return chosen[1][version]

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
        return await self._deployments.get(model)

    async def _read_variants(self, model: str) -> list[ModelVariant]:
        return await self.registry.list(model)

    async def _read_deployment(self, model: str) -> DeploymentSpec:
        try:
            return await self.registry.get_deployment(model)
        except NotFound:
            return _defaults(model)


def _defaults(model: str) -> DeploymentSpec:
    return deployment.validate(DeploymentSpec(model=model))


def _pick_version(variants: list[ModelVariant], model: str, version: str) -> list[ModelVariant]:
    chosen = [v for v in variants if v.version == version]
    if not chosen:
        raise ModelNotFound(model, version)
    return chosen
