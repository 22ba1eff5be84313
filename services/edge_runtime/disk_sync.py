"""What a runtime holds on disk, kept in step with the registry: pulls (as deltas against versions
held here where the registry can, making room within the disk budget but never for a version
requests go to), and deletions, heard as events or caught up from the registry's tombstones."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from prometheus_client import Counter

from services.common.background import Background, KeyedLocks
from services.common.errors import CneiError
from services.common.model_spec import ModelVariant, Tombstone, version_key
from services.common.registry_client import RegistryClient
from services.common.served import models_in_use, versions_in_use
from services.edge_runtime.cache import Deleted, DiskCache
from services.edge_runtime.eviction import CachedArtifact
from services.edge_runtime.l1 import L1Cache
from services.edge_runtime.reach import REGISTRY_RETRY_S, RegistryReach, unreachable
from services.edge_runtime.resolution import DEPLOYMENT_TTL_S, Resolver

log = logging.getLogger(__name__)
OFFERED_BASES = 16  # versions held that a pull offers the registry as delta bases
SYNCED_BYTES = Counter("cnei_artifact_bytes_synced_total",
                       "Model artifact bytes pulled from the registry (as sent: a delta's, not the artifact's)")
PULLS = Counter("cnei_artifact_pulls_total", "Artifacts pulled from the registry, whole or as a delta against "
                "another version held here", ["encoding"])


class DiskSync:
    """The disk cache's side of a runtime: pulls each artifact once however many want it, learns
    which versions requests go to before making room, and forgets what the registry deleted
    (`deleted`: the variant keys never loaded again, shared with the resolver and the loader)."""

    def __init__(self, registry: RegistryClient, disk: DiskCache, l1: L1Cache, reach: RegistryReach,
                 deleted: set[str], resolver: Resolver, background: Background):
        self.registry = registry
        self.disk, self.l1, self.reach, self.deleted = disk, l1, reach, deleted
        self.resolver, self.background = resolver, background
        self.pull_locks = KeyedLocks()  # by sha256
        # model on disk -> the versions requests go to (`served.versions_in_use` over every deployment),
        # as last read for the models then on disk (`_in_use_of`); read again after `_in_use_until`
        # (events make it 0) or once another model is on disk
        self._in_use: dict[str, set[str]] = {}
        self._in_use_of: set[str] = set()
        self._in_use_until = 0.0

    def versions_in_use_changed(self) -> None:
        """A deployment (or a model's versions) changed: ask which versions are in use at the next pull."""
        self._in_use_until = 0.0

    # --- deletions ----------------------------------------------------------------------------
    async def model_deleted(self, name: str, version: str, precisions: list[str], sha256: str = "") -> None:
        """A version (or some of its variants) was deleted from the registry: forget resolutions
        and the version the deployment serves, and never load those variants again. Their
        manifests leave the disk cache at once (a restarted runtime never resolves them, offline
        either) with the artifacts no other variant there names; a copy in memory serves on until
        it leaves (offline autonomy), and its artifact goes then (`left_memory`). `sha256`: a
        tombstone's (`apply_tombstones`), only a manifest naming those bytes leaves the disk."""
        self._mark_deleted(name, version, precisions)
        await self.forget_on_disk([Deleted(name, version, precision, sha256) for precision in precisions])

    def _mark_deleted(self, name: str, version: str, precisions: list[str]) -> None:
        """Never load these variants again; forget the model's resolutions and deployment."""
        self.deleted.update(f"{name}:{version}:{precision}" for precision in precisions)
        self.resolver.forget_resolutions(name)
        self.resolver.forget_deployment(name)
        self.versions_in_use_changed()

    async def forget_deleted(self, names: tuple[str, ...] = ()) -> bool:
        """Forget what was deleted from the registry while its events did not reach this node
        (stopped, cut off from NATS): the registry's tombstones of the models held here, on disk
        or in memory (or of those `names`), read in one call (every model's, or the one named's),
        applied as the events would have been (`apply_tombstones`). Only tombstones delete: a model
        the registry does not know (one restored empty, another registry) is kept. False when the
        registry was unreachable."""
        held = {v.name for v in self.disk.variants()} | {m.variant.name for m in self.l1.values()}
        wanted = held if not names else held & set(names)
        if not wanted:
            return True
        asked = next(iter(wanted)) if len(wanted) == 1 else ""
        try:
            tombstones = await self.registry.deleted(asked)
        except CneiError as exc:
            log.warning("could not read what was deleted of %s from the registry: %s",
                        asked or "the models held here", exc.message)
            return not unreachable(exc)
        await self.apply_tombstones([t for t in tombstones if t.name in wanted])
        return True

    async def apply_tombstones(self, tombstones: list[Tombstone]) -> list[str]:
        """Forget each variant a tombstone names, as its deletion event does (`model_deleted`),
        where this node holds the tombstone's bytes for it (on disk or in memory): a variant pushed
        again with other bytes after the deletion stays. Their manifests and bytes leave the disk
        cache in one sweep. The variant keys forgotten."""
        if not tombstones:
            return []
        held = {v.key: v.sha256 for v in self.resolver.local_variants(*{t.name for t in tombstones})}
        forgotten: list[Tombstone] = []
        for t in tombstones:
            if t.key not in self.deleted and held.get(t.key) == t.sha256:
                log.info("%s was deleted from the registry while this node did not hear of it: forgetting it", t.key)
                self._mark_deleted(t.name, t.version, [t.precision])
                forgotten.append(t)
        if forgotten:
            await self.forget_on_disk([Deleted(t.name, t.version, t.precision, t.sha256) for t in forgotten])
        return [t.key for t in forgotten]

    async def forget_on_disk(self, deleted: list[Deleted]) -> None:
        """Delete these variants' manifests (an entry's `sha256`: only one naming these bytes) and
        the artifacts no manifest names any more, but those a model in memory runs (`DiskCache.forget`)."""
        in_memory = {m.variant.sha256 for m in self.l1.values()}
        await asyncio.to_thread(self.disk.forget, deleted, in_memory)

    def left_memory(self, variant: ModelVariant) -> None:
        """The variant left memory: its artifact's last use is now, and a deleted variant's
        artifact leaves the disk cache unless a variant there names it."""
        self.disk.touch(variant.sha256)
        if variant.key in self.deleted:
            self.background.spawn(self.forget_on_disk([]))

    # --- pulls --------------------------------------------------------------------------------
    async def _learn_versions_in_use(self, on_disk: set[str]) -> None:
        """Read which versions of the models `on_disk` requests go to (`served.versions_in_use` over
        every deployment the registry lists: a model's own stable version and canary, the versions
        ensemble steps and joint deployments run), so making room never deletes one; at most every
        DEPLOYMENT_TTL_S unless a model not on disk then is now. What was known is kept while the
        registry is away (asked again after REGISTRY_RETRY_S) or cannot say."""
        now = time.monotonic()
        fresh = now < self._in_use_until and on_disk <= self._in_use_of
        if not on_disk or fresh or self.reach.offline:
            return
        try:
            specs = await self.registry.list_deployments()
            self._in_use = {name: set(versions_in_use(name, specs, await self.registry.list(name)))
                            for name in sorted(on_disk & models_in_use(specs))}
            self._in_use_of, self._in_use_until = on_disk, time.monotonic() + DEPLOYMENT_TTL_S
        except CneiError as exc:
            log.warning("versions in use unknown (%s): making room keeps those last known", exc.message)
            self._in_use_until = time.monotonic() + REGISTRY_RETRY_S
            self.reach.failed(exc)

    def _kept(self) -> Callable[[CachedArtifact], bool]:
        """Which artifacts the disk cache must keep, as of now: those models in memory run (a
        deleted variant's too, which no manifest names) and those of the versions requests go to
        (`_learn_versions_in_use`: what coordinators ask for, offline too)."""
        loaded = {m.variant.sha256 for m in self.l1.values()}
        in_use = {(name, version) for name, versions in self._in_use.items() for version in versions}
        return lambda a: a.sha256 in loaded or any((v.name, v.version) in in_use for v in a.variants)

    async def ensure_on_disk(self, variant: ModelVariant) -> bool:
        """Make the variant's artifact and manifest local; True when bytes were downloaded (once,
        however many callers want it at the same time: a request and a resync)."""
        async with self.pull_locks.hold(variant.sha256):
            return await self.pull(variant)

    async def pull(self, variant: ModelVariant) -> bool:
        """`ensure_on_disk` with the variant's pull lock held."""
        if self.disk.has(variant) or self.disk.adopt(variant):
            return False
        # the cache's manifests, read once for the pull (again only if the cache changed meanwhile);
        # the other versions of the model held here, likeliest base first (same precision, newest):
        # the registry may send a delta against one
        contents = self.disk.contents()
        mine = sorted((v for v in contents.variants() if v.name == variant.name),
                      key=lambda v: (v.precision == variant.precision, version_key(v.version)), reverse=True)
        held = {v.sha256: self.disk.artifact_path(v.sha256) for v in mine[:OFFERED_BASES]}
        with self.disk.pinned(*held):  # a delta's base stays until it is decoded, then may make room
            pulled = await self.registry.pull_artifact(variant.sha256, held)
        if self.disk.max_bytes > 0:  # only making room asks which versions requests go to
            if not self.disk.current(contents):
                contents = self.disk.contents()
            await self._learn_versions_in_use({v.name for v in contents.variants()})
        await asyncio.to_thread(self.disk.put, variant, pulled.data, self._kept(), contents)
        if variant.key in self.deleted:  # deleted while its bytes were on the way
            await self.forget_on_disk([Deleted(variant.name, variant.version, variant.precision)])
        SYNCED_BYTES.inc(pulled.wire_bytes)
        PULLS.labels("delta" if pulled.base else "full").inc()
        if pulled.base:
            log.info("pulled %s as a delta against %s: %d of %d bytes", variant.key, pulled.base[:12],
                     pulled.wire_bytes, len(pulled.data))
        return True

    @contextlib.asynccontextmanager
    async def held_artifact(self, variant: ModelVariant) -> AsyncIterator[Path]:
        """The variant's artifact on disk, pulled first where it is not, kept there while the
        block runs (a load, a sibling measurement)."""
        with self.disk.pinned(variant.sha256):
            await self.ensure_on_disk(variant)
            yield self.disk.artifact_path(variant.sha256)
