"""Which cached artifacts leave the disk cache to make room for a new one (pure)."""
from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass

from services.common.model_spec import ModelVariant, version_key


@dataclass(frozen=True)
class CachedArtifact:
    """One artifact on disk with the manifests of the variants that share its bytes."""

    sha256: str
    size: int  # bytes on disk: the artifact's and its manifests'
    last_use: int  # when it was last stored, loaded or left memory (ns since the epoch)
    variants: tuple[ModelVariant, ...]


def newest_versions(variants: Iterable[ModelVariant]) -> set[str]:
    """The sha256 of the newest version of each (model, precision): what offline resolution of a
    request naming no version falls back to (`pick_variant`), in whatever precision it asks for."""
    newest: dict[tuple[str, str], ModelVariant] = {}
    for v in variants:
        held = newest.get((v.name, v.precision))
        if held is None or version_key(v.version) > version_key(held.version):
            newest[(v.name, v.precision)] = v
    return {v.sha256 for v in newest.values()}


def choose_evictions(cached: Iterable[CachedArtifact], incoming: int, budget: int,
                     protected: Set[str]) -> list[CachedArtifact] | None:
    """The least recently used artifacts, none of them `protected` (by sha256), whose deletion
    lets `incoming` more bytes fit within `budget` beside the rest: [] when they fit already (or
    `budget` is 0: no limit), None when deleting every unprotected artifact would not be enough."""
    cached = list(cached)
    over = sum(a.size for a in cached) + incoming - budget
    if budget <= 0 or over <= 0:
        return []
    chosen = []
    for artifact in sorted((a for a in cached if a.sha256 not in protected), key=lambda a: a.last_use):
        if over <= 0:
            break
        chosen.append(artifact)
        over -= artifact.size
    return chosen if over <= 0 else None
