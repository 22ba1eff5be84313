"""Which artifacts leave the disk cache to make room (pure): least recently used first, never a
protected one, nothing when even all of them would not be enough."""
from __future__ import annotations

import pytest

from services.common.model_spec import ModelVariant
from services.edge_runtime.eviction import CachedArtifact, choose_evictions, newest_versions


def _variant(name: str, version: str, precision: str = "FP32") -> ModelVariant:
    return ModelVariant(name, version, precision, f"{name}-{version}-{precision}", 10, [], [])


def _cached(*sizes_and_uses: tuple[int, int]) -> list[CachedArtifact]:
    return [CachedArtifact(f"sha{i}", size, use, ()) for i, (size, use) in enumerate(sizes_and_uses)]


@pytest.mark.parametrize("incoming, budget, protected, expected", [
    (10, 100, set(), []),  # fits
    (10, 0, set(), []),  # no budget
    (30, 100, set(), ["sha1"]),  # the least recently used (use 1) first
    (50, 100, set(), ["sha1", "sha2"]),
    (30, 100, {"sha1"}, ["sha2"]),  # a protected one is passed over
    (70, 100, {"sha1"}, ["sha2", "sha0"]),
    (71, 100, {"sha1"}, None),  # even every unprotected one is not enough: none chosen
    (101, 100, set(), None),
], ids=["fits", "no budget", "one", "two", "protected skipped", "all unprotected", "not enough", "bigger than budget"])
def test_the_least_recently_used_unprotected_artifacts_make_room_or_none_when_they_cannot(
        incoming, budget, protected, expected):
    cached = _cached((30, 3), (30, 1), (30, 2))  # 90 bytes held
    chosen = choose_evictions(cached, incoming, budget, protected)
    assert (None if chosen is None else [a.sha256 for a in chosen]) == expected


def test_the_newest_version_of_each_model_is_kept_in_each_precision_numerically():
    variants = [_variant("m", "2"), _variant("m", "10"), _variant("m", "9", "INT8"), _variant("n", "1")]
    assert newest_versions(variants) == {"m-10-FP32", "m-9-INT8", "n-1-FP32"}
