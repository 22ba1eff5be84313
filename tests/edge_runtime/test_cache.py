"""The runtime's model caches: L1 (loaded models, LRU by bytes) and the verified disk cache."""
from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from services.common.errors import ErrorCode, FailedPrecondition
from services.common.model_spec import ModelVariant, TensorSpec
from services.edge_runtime.cache import (DISK_BYTES, DISK_EVICTIONS, Deleted, DiskCache, DiskCacheFull,
                                         variant_from_json, variant_to_json)
from services.edge_runtime.l1 import L1Cache

ARTIFACT = b"pretend this is an ONNX model"


def _variant(data: bytes = ARTIFACT, version: str = "1", precision: str = "FP32") -> ModelVariant:
    return ModelVariant(
        name="digits", version=version, precision=precision,
        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
        inputs=[TensorSpec("input", "FP32", (-1, 64))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
        metadata={"accuracy": "0.97"}, created_at=1700000000.5,
    )


def _filled(sizes: dict[str, int], budget: int) -> L1Cache:
    cache = L1Cache(budget)
    for key, size in sizes.items():
        assert cache.put(key, f"model {key}", size) == {}
    return cache


def test_l1_evicts_the_least_recently_inserted_item_when_over_budget():
    cache = _filled({"a": 40, "b": 40}, budget=100)
    assert cache.put("c", "model c", 40) == {"a": "model a"}
    assert cache.keys() == ["b", "c"]
    assert cache.bytes_used == 80


def test_l1_reading_an_item_protects_it_from_the_next_eviction():
    cache = _filled({"a": 40, "b": 40}, budget=100)
    assert cache.get("a") == "model a"
    assert cache.put("c", "model c", 40) == {"b": "model b"}
    assert cache.keys() == ["a", "c"]


def test_l1_evicts_as_many_old_items_as_the_new_one_needs_oldest_first():
    cache = _filled({"a": 30, "b": 30, "c": 30}, budget=100)
    assert list(cache.put("d", "model d", 75).items()) == [("a", "model a"), ("b", "model b"), ("c", "model c")]
    assert cache.keys() == ["d"]


def test_l1_never_evicts_the_newly_inserted_item_even_if_it_alone_exceeds_the_budget():
    cache = _filled({"a": 10}, budget=100)
    assert cache.put("huge", "model huge", 500) == {"a": "model a"}
    assert cache.keys() == ["huge"]
    assert cache.get("huge") == "model huge"
    assert cache.bytes_used == 500


@pytest.mark.parametrize(
    ("sizes", "budget"),
    [({"a": 50, "b": 50}, 100), ({"a": 1}, 1), ({"a": 0, "b": 0}, 0)],
    ids=["two-halves", "single-byte", "zero-size"],
)
def test_l1_keeps_everything_that_fits_the_budget_exactly(sizes, budget):
    cache = _filled(sizes, budget)
    assert cache.keys() == list(sizes)
    assert cache.bytes_used == sum(sizes.values())


def test_l1_putting_an_existing_key_replaces_its_value_and_size_and_makes_it_recent():
    cache = _filled({"a": 40, "b": 40}, budget=100)
    assert cache.put("a", "model a v2", 10) == {}
    assert cache.keys() == ["b", "a"]
    assert cache.get("a") == "model a v2"
    assert cache.bytes_used == 50


def test_l1_a_missing_key_reads_as_none_and_removal_reports_whether_it_was_there():
    cache = _filled({"a": 10}, budget=100)
    assert cache.get("missing") is None
    assert cache.remove("a") == "model a"
    assert cache.remove("a") is None
    assert (cache.keys(), cache.bytes_used) == ([], 0)


def test_disk_put_stores_the_artifact_under_its_sha256(tmp_path):
    disk = DiskCache(tmp_path / "cache")
    variant = _variant()
    path = disk.put(variant, ARTIFACT)
    assert path == disk.artifact_path(variant.sha256)
    assert path.read_bytes() == ARTIFACT
    assert disk.has(variant)
    assert not list(disk.root.glob("*.tmp"))


def test_disk_put_refuses_data_whose_sha256_differs_and_stores_nothing(tmp_path):
    disk = DiskCache(tmp_path)
    variant = _variant()
    with pytest.raises(FailedPrecondition, match=f"artifact of digits:1:FP32 hashes to .*, expected {variant.sha256}"):
        disk.put(variant, ARTIFACT + b"tampered")
    assert not disk.has(variant)
    assert list(tmp_path.iterdir()) == []
    assert disk.variants() == []


def test_disk_variants_reads_every_stored_manifest_back(tmp_path):
    disk = DiskCache(tmp_path)
    stored = [_variant(), _variant(version="2"), _variant(b"int8 bytes", precision="INT8")]
    for variant, data in zip(stored, [ARTIFACT, ARTIFACT, b"int8 bytes"]):
        disk.put(variant, data)
    got = DiskCache(tmp_path).variants()
    assert sorted(got, key=lambda v: v.key) == sorted(stored, key=lambda v: v.key)
    assert got[0].inputs[0].shape == (-1, 64)


def test_disk_variants_skips_manifests_whose_artifact_is_gone_or_that_are_unreadable(tmp_path):
    disk = DiskCache(tmp_path)
    kept, lost = _variant(), _variant(b"other", version="2")
    disk.put(kept, ARTIFACT)
    disk.put(lost, b"other")
    disk.artifact_path(lost.sha256).unlink()
    (tmp_path / "broken--1--FP32.json").write_text("{not json")
    (tmp_path / "partial--1--FP32.json").write_text('{"name": "partial"}')
    assert disk.variants() == [kept]


def test_disk_intact_tells_artifacts_that_still_hash_to_their_sha256_from_damaged_ones(tmp_path):
    disk = DiskCache(tmp_path)
    variant = _variant()
    disk.put(variant, ARTIFACT)
    assert disk.intact(variant.sha256)
    disk.artifact_path(variant.sha256).write_bytes(ARTIFACT[:10])  # truncated in place
    assert not disk.intact(variant.sha256)
    disk.discard(variant.sha256)
    assert not disk.intact(variant.sha256) and not disk.has(variant)
    assert disk.variants() == []  # its manifest stays, unused until the artifact is back
    disk.put(variant, ARTIFACT)
    assert disk.intact(variant.sha256) and disk.variants() == [variant]


def test_opening_a_disk_cache_removes_what_interrupted_downloads_left_and_nothing_else(tmp_path):
    variant = _variant()
    DiskCache(tmp_path).put(variant, ARTIFACT)
    left = [tmp_path / f"{variant.sha256}.onnx.{'a1' * 16}.tmp", tmp_path / f"digits--2--FP32.json.{'0f' * 16}.tmp"]
    for path in left:
        path.write_bytes(b"half an artifact")
    others = [tmp_path / "outbox.tmp", tmp_path / "notes.tmp"]  # not the cache's temporaries
    for path in others:
        path.write_bytes(b"kept")
    disk = DiskCache(tmp_path)
    assert not any(path.exists() for path in left)
    assert all(path.read_bytes() == b"kept" for path in others)
    assert disk.variants() == [variant] and disk.intact(variant.sha256)


def test_a_variant_survives_its_json_manifest_form():
    variant = replace(_variant(), metadata={"labels": '["0", "1"]'})
    assert variant_from_json(variant_to_json(variant)) == variant



def test_manifests_of_names_and_versions_that_join_alike_are_kept_apart(tmp_path):
    disk = DiskCache(tmp_path)
    dashed_name = replace(_variant(), name="a--b", version="1")
    dashed_version = replace(_variant(b"other bytes"), name="a", version="b--1")
    disk.put(dashed_name, ARTIFACT)
    disk.put(dashed_version, b"other bytes")
    assert disk.manifest_path(dashed_name) != disk.manifest_path(dashed_version)
    assert disk.has(dashed_name) and disk.has(dashed_version)
    assert sorted(DiskCache(tmp_path).variants(), key=lambda v: v.name) == [dashed_version, dashed_name]


def test_manifests_written_under_the_old_names_are_renamed_when_the_cache_opens(tmp_path):
    variant = replace(_variant(), name="a--b", version="1")
    (tmp_path / f"{variant.sha256}.onnx").write_bytes(ARTIFACT)
    old = tmp_path / "a--b--1--FP32.json"
    old.write_text(variant_to_json(variant))
    unreadable = tmp_path / "broken--1--FP32.json"
    unreadable.write_text("{not json")
    disk = DiskCache(tmp_path)
    assert not old.exists() and disk.manifest_path(variant).is_file()
    assert disk.has(variant) and disk.variants() == [variant]
    assert unreadable.read_text() == "{not json"  # left as it was, skipped as before


def _sized(version: str, name: str = "digits", precision: str = "FP32") -> tuple[ModelVariant, bytes]:
    """A variant whose artifact is 1000 bytes of its own."""
    data = f"{name}:{version}:{precision}".encode().ljust(1000, b".")
    return replace(_variant(data, version, precision), name=name), data


def _entry(variant: ModelVariant) -> int:
    """Bytes on disk of a variant's 1000-byte artifact and its manifest."""
    return 1000 + len(variant_to_json(variant).encode())


def _cached_versions(disk: DiskCache) -> list[str]:
    return sorted(v.version for v in disk.variants())


def test_disk_put_evicts_the_least_recently_used_artifacts_with_their_manifests_to_stay_within_budget(tmp_path):
    stored = [_sized(str(version)) for version in range(1, 5)]
    disk = DiskCache(tmp_path, max_bytes=sum(_entry(v) for v, _ in stored[:3]))
    evictions = DISK_EVICTIONS._value.get()
    for variant, data in stored[:3]:
        disk.put(variant, data)
    disk.touch(stored[0][0].sha256)  # version 1 used since: version 2 is now the least recent
    disk.put(*stored[3])
    assert _cached_versions(disk) == ["1", "3", "4"]
    assert not disk.artifact_path(stored[1][0].sha256).exists() and not disk.manifest_path(stored[1][0]).exists()
    assert disk.bytes_used() <= disk.max_bytes and DISK_BYTES._value.get() == disk.bytes_used()
    assert DISK_EVICTIONS._value.get() == evictions + 1


def test_disk_put_never_evicts_kept_pinned_or_the_newest_version_of_a_model_in_a_precision(tmp_path):
    old, older, newest_int8, pinned, kept = (_sized("1"), _sized("2"), _sized("1", precision="INT8"),
                                             _sized("3"), _sized("4"))
    incoming = _sized("1", name="other")
    disk = DiskCache(tmp_path, max_bytes=sum(_entry(v) for v, _ in (old, older, newest_int8, pinned, kept)))
    for variant, data in (old, older, newest_int8, pinned, kept):
        disk.put(variant, data)
    disk.touch(kept[0].sha256)  # "4", the newest FP32, is the least recent after all
    with disk.pinned(pinned[0].sha256):
        disk.put(*incoming, keep=lambda a: any(v.version == "4" for v in a.variants))
    assert _cached_versions(disk) == ["1", "1", "2", "3", "4"]  # "1" FP32 went: the oldest that may
    assert not disk.has(old[0]) and disk.has(newest_int8[0]) and disk.has(incoming[0])
    disk.put(*_sized("2", name="other"))  # the least recent that may go now: "2"
    assert {v.key for v in disk.variants()} == {"digits:1:INT8", "digits:3:FP32", "digits:4:FP32", "other:1:FP32",
                                                "other:2:FP32"}
    disk.put(*_sized("5"))  # "3", pinned before, is the least recent that may go now
    assert {v.key for v in disk.variants()} == {"digits:1:INT8", "digits:4:FP32", "digits:5:FP32", "other:1:FP32",
                                                "other:2:FP32"}


def test_a_put_making_room_from_a_read_of_the_cache_reads_it_again_when_it_changed_since(tmp_path):
    stored = [_sized(str(version)) for version in range(1, 5)]
    disk = DiskCache(tmp_path, max_bytes=sum(_entry(v) for v, _ in stored[:2]))
    disk.put(*stored[0])
    contents = disk.contents()
    assert [v.version for v in contents.variants()] == ["1"] and disk.current(contents)
    disk.put(*stored[1])  # stored after the read: the read is stale
    assert not disk.current(contents)
    disk.put(*stored[2], contents=contents)
    assert _cached_versions(disk) == ["2", "3"] and disk.bytes_used() <= disk.max_bytes
    disk.put(*stored[3], contents=disk.contents())  # a read still current: making room uses it
    assert _cached_versions(disk) == ["3", "4"] and disk.bytes_used() <= disk.max_bytes


def test_an_artifact_that_cannot_fit_beside_what_must_stay_is_refused_naming_sizes_and_nothing_leaves(tmp_path):
    first, second = _sized("1", name="a"), _sized("1", name="b")  # each the newest of its model
    disk = DiskCache(tmp_path, max_bytes=_entry(first[0]) + _entry(second[0]))
    disk.put(*first)
    disk.put(*second)
    third = _sized("1", name="c")
    with pytest.raises(DiskCacheFull) as full:
        disk.put(*third)
    assert full.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert full.value.message.startswith(
        f"disk cache full: the artifact of c:1:FP32 needs {_entry(third[0])} bytes, and "
        f"{_entry(first[0]) + _entry(second[0])} bytes of its budget of {disk.max_bytes} bytes "
        f"(CNEI_RUNTIME_DISK_CACHE_MAX_BYTES) are artifacts that cannot be evicted")
    assert {v.name for v in disk.variants()} == {"a", "b"} and not list(tmp_path.glob("*.tmp"))


def test_variants_sharing_an_artifact_leave_together_and_no_budget_means_no_eviction(tmp_path):
    shared, data = _sized("1")
    disk = DiskCache(tmp_path, max_bytes=3 * _entry(shared))
    disk.put(shared, data)
    assert disk.adopt(replace(shared, version="0"))  # same bytes under an older version
    disk.put(*_sized("2"))
    disk.put(*_sized("3"))  # makes room: "0" and "1" share the least recent artifact
    assert _cached_versions(disk) == ["2", "3"]
    unlimited = DiskCache(tmp_path / "unlimited")
    for version in range(10):
        unlimited.put(*_sized(str(version)))
    assert len(unlimited.variants()) == 10


def test_forgetting_deleted_variants_deletes_their_manifests_and_the_bytes_no_manifest_names_but_those_in_use_or_pinned(
        tmp_path):
    shared, in_memory, pinned, alone = _sized("1"), _sized("2"), _sized("4"), _sized("5")
    disk = DiskCache(tmp_path)
    for variant, data in (shared, in_memory, pinned, alone):
        disk.put(variant, data)
    assert disk.adopt(replace(shared[0], version="3"))  # the same bytes under a version not deleted
    with disk.pinned(pinned[0].sha256):
        dropped = disk.forget([Deleted("digits", v, "FP32") for v in ("1", "2", "4", "5")], {in_memory[0].sha256})
    assert dropped == [alone[0].sha256] and _cached_versions(disk) == ["3"]
    assert {p.stem for p in tmp_path.glob("*.onnx")} == {shared[0].sha256, in_memory[0].sha256, pinned[0].sha256}
    assert disk.forget([], {in_memory[0].sha256}) == [pinned[0].sha256]  # unpinned: it goes at the next forget
    assert DiskCache(tmp_path).variants() == [replace(shared[0], version="3")]  # a new process holds nothing
    assert {p.stem for p in tmp_path.glob("*.onnx")} == {shared[0].sha256}


def test_an_artifact_the_caller_keeps_stays_when_room_is_made_though_no_manifest_names_it(tmp_path):
    deleted, other = _sized("1"), _sized("1", name="other")
    disk = DiskCache(tmp_path, max_bytes=_entry(deleted[0]) + _entry(other[0]))
    disk.put(*deleted)
    disk.forget([Deleted("digits", "1", "FP32")], {deleted[0].sha256})  # deleted while a model in memory runs it
    disk.put(*other)
    with pytest.raises(DiskCacheFull):
        disk.put(*_sized("1", name="third"), keep=lambda a: a.sha256 == deleted[0].sha256)
    assert disk.artifact_path(deleted[0].sha256).is_file()


@pytest.mark.parametrize(("tombstone_bytes", "forgotten"), [(b"first bytes", True), (b"bytes pushed again", False)],
                         ids=["the-bytes-held", "other-bytes"])
def test_forgetting_a_variant_by_its_tombstone_takes_only_a_manifest_naming_the_tombstones_bytes(
        tmp_path, tombstone_bytes, forgotten):
    held = _variant(b"first bytes")
    disk = DiskCache(tmp_path)
    disk.put(held, b"first bytes")
    disk.forget([Deleted("digits", "1", "FP32", hashlib.sha256(tombstone_bytes).hexdigest())])
    assert disk.has(held) is not forgotten and disk.artifact_path(held.sha256).is_file() is not forgotten
