"""Model resolution of a runtime: the variant a request names, from the registry (kept briefly, then
served as it is while it is read again in the background) or, while it is away, from the variants
this node holds; and what the runtime keeps of each model's deployment (its batch size cap and the
version it serves)."""
from __future__ import annotations

import logging
import time

from services.common.background import Background
from services.common.deployment import DeploymentSpec
from services.common.errors import CneiError, ModelNotFound, NotFound, Unavailable
from services.common.model_spec import ModelVariant, pick_variant
from services.common.registry_client import RegistryClient
from services.common.served import served_version
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.l1 import L1Cache
from services.edge_runtime.reach import RegistryReach

log = logging.getLogger(__name__)
RESOLVE_TTL_S = 2.0
DEPLOYMENT_TTL_S = 30.0  # deployments are read again after this (events drop what was read at once)


class Resolver:
    """Resolutions and deployments as this runtime knows them: read from the registry and kept
    for a while (events drop them at once), then served as they are while `background` reads them
    again (one read per resolution or deployment: a registry that stops answering costs requests
    of a model resolved before no wait), answered from the disk cache and memory while the
    registry is unreachable (`reach`). `deleted`: the variant keys deleted from the registry, left
    out of what the disk cache answers until the registry resolves them again."""

    def __init__(self, registry: RegistryClient, disk: DiskCache, l1: L1Cache, reach: RegistryReach,
                 deleted: set[str], background: Background | None = None):
        self.registry = registry
        self.disk, self.l1, self.reach, self.deleted = disk, l1, reach, deleted
        self.background = background or Background()
        self._refreshing: set[tuple] = set()  # what is being read again in the background
        self._resolved: dict[tuple[str, str, str], tuple[ModelVariant, float]] = {}
        # model -> (its deployment's max_batch_size, pinned stable version, until)
        self._caps: dict[str, tuple[int, str, float]] = {}

    async def deployment_cap(self, name: str) -> int:
        """The most rows the model's deployment lets one call carry (its `batching.max_batch_size`),
        which the runtime's batcher never exceeds when it merges callers' requests; 0 when no
        deployment was applied or the registry cannot say (the runtime's own rules apply)."""
        return (await self.deployed_as(name))[0]

    async def deployed_as(self, name: str) -> tuple[int, str]:
        """What this runtime keeps of the model's deployment, read at most every DEPLOYMENT_TTL_S:
        (its max_batch_size, the version it serves: `read_deployment`); max_batch_size 0 when
        none was applied; (0, "") when the registry cannot say and nothing was known (what was
        known is kept while it is away)."""
        cached = self._caps.get(name)
        if cached and cached[2] <= time.monotonic():
            self._refresh(("deployment", name), self._read_deployment_again(name))
        if cached:
            return cached[0], cached[1]
        if self.reach.offline:  # never wait for the registry here
            return 0, ""
        try:
            await self.read_deployment(name)
        except CneiError as exc:
            # offline for every model, at once: resolution goes to the disk cache without waiting
            # out a second registry call (a request naming no version paid two timeouts)
            if not self.reach.failed(exc):
                raise
            cap, stable = (cached[0], cached[1]) if cached else (0, "")  # keep what was known
            log.warning("registry unreachable (%s); serving from the local cache", exc)
            self._caps[name] = (cap, stable, self.reach.down_until)  # asked again once the registry may be back
            return cap, stable
        return self._caps[name][:2]  # what read_deployment kept

    async def _read_deployment_again(self, name: str) -> None:
        """`read_deployment` in the background; what was known stays while the registry is away."""
        if self.reach.offline:  # found unreachable meanwhile (for another model): asked once it may be back
            cached = self._caps.get(name)
            if cached is not None:
                self._caps[name] = (*cached[:2], self.reach.down_until)
            return
        try:
            await self.read_deployment(name)
        except CneiError as exc:
            cached = self._caps.get(name)
            if cached is None:
                return
            if self.reach.failed(exc):
                log.warning("registry unreachable (%s); serving %s's deployment as last read", exc, name)
            self._caps[name] = (*cached[:2], max(self.reach.down_until, time.monotonic() + RESOLVE_TTL_S))

    def _refresh(self, key: tuple, read) -> None:
        """Run `read` (a coroutine) in the background unless `key` is being read already."""
        if key in self._refreshing:
            read.close()
            return
        self._refreshing.add(key)
        self.background.spawn(read).add_done_callback(lambda _: self._refreshing.discard(key))

    async def read_deployment(self, name: str) -> tuple[DeploymentSpec | None, str]:
        """The model's deployment from the registry (None: none applied) and the version serving
        requests that name none (`served.served_version` over the model's variants; "" when none
        was applied or the registry has no version: its own latest), kept for DEPLOYMENT_TTL_S as
        what this runtime knows of it (`deployed_as`: a request after a resync reads it not again)."""
        try:
            spec = await self.registry.get_deployment(name)
        except NotFound:
            spec = None
        try:
            stable = served_version(spec, await self.registry.list(name)) if spec else ""
        except ModelNotFound:
            stable = ""
        cap = spec.batching.max_batch_size if spec else 0
        self._caps[name] = (cap, stable, time.monotonic() + DEPLOYMENT_TTL_S)
        return spec, stable

    def forget_deployment(self, name: str = "") -> None:
        """Read the model's deployment (or every model's) again at its next request."""
        if name:
            self._caps.pop(name, None)
        else:
            self._caps.clear()

    def forget_resolutions(self, name: str = "") -> None:
        """Drop cached resolutions (all, or one model's) so the next request asks the registry."""
        self._resolved = {k: v for k, v in self._resolved.items() if name and k[0] != name}

    async def resolve(self, name: str, version: str = "", precision: str = "") -> ModelVariant:
        """Registry resolution, cached briefly; the disk cache answers when the registry is away.
        A request naming no version gets the one the model's deployment serves, as the coordinator
        serves it (`served.served_version`); a canary is the coordinator's to split."""
        if not version:
            version = (await self.deployed_as(name))[1]
        key = (name, version, precision.upper())
        cached = self._resolved.get(key)
        if cached:
            if cached[1] <= time.monotonic():
                self._refresh(key, self._resolve_again(key))
            return cached[0]
        if self.reach.offline:
            try:
                return self._resolve_offline(name, version, precision)
            except Unavailable:
                pass  # not cached here: ask the registry after all
        try:
            variant = await self.registry.resolve(name, version, precision)
        except CneiError as exc:
            if not self.reach.failed(exc):
                raise
            log.warning("registry unreachable (%s); resolving %s from the local cache", exc, name)
            return self._resolve_offline(name, version, precision)
        self.deleted.discard(variant.key)  # the registry holds it (again: pushed after its deletion)
        self._resolved[key] = (variant, time.monotonic() + RESOLVE_TTL_S)
        return variant

    async def _resolve_again(self, key: tuple[str, str, str]) -> None:
        """A resolution past its lifetime read again in the background: kept while the registry is
        away (asked again once it may be back), dropped when the registry answers with an error (the
        next request asks it itself)."""
        if self.reach.offline:  # found unreachable meanwhile (for another model): asked once it may be back
            if key in self._resolved:
                self._resolved[key] = (self._resolved[key][0], self.reach.down_until)
            return
        try:
            variant = await self.registry.resolve(*key)
        except CneiError as exc:
            cached = self._resolved.get(key)
            if cached is None:
                return
            if not self.reach.failed(exc):
                self._resolved.pop(key, None)
                return
            log.warning("registry unreachable (%s); serving %s as resolved before", exc, key[0])
            self._resolved[key] = (cached[0], self.reach.down_until)
            return
        if key in self._resolved:  # not forgotten meanwhile (an event)
            self.deleted.discard(variant.key)
            self._resolved[key] = (variant, time.monotonic() + RESOLVE_TTL_S)

    def _resolve_offline(self, name: str, version: str, precision: str) -> ModelVariant:
        """Resolution from the disk cache alone (the registry is unreachable), kept until the
        registry is asked again (reading the cache's manifests per request costs ~0.2 ms)."""
        try:
            variant = pick_variant(self.local_variants(name), name, version, precision)
        except ModelNotFound:
            raise Unavailable(f"registry unreachable and model '{name}' is not cached on this node") from None
        self._resolved[(name, version, precision.upper())] = (variant, self.reach.down_until)
        return variant

    def local_variants(self, *names: str) -> list[ModelVariant]:
        """The models' variants this node serves without the registry: those on disk, and those
        in memory (a deleted variant's manifest is gone from disk, its copy in memory serves on)."""
        local = {v.key: v for v in self.disk.variants() if v.name in names and v.key not in self.deleted}
        local.update((m.variant.key, m.variant) for m in self.l1.values() if m.variant.name in names)
        return list(local.values())
