"""The registry as a real process: the metadata keys the services interpret are checked at push
time, and a push of the same bytes again with other metadata is refused rather than dropped."""
from __future__ import annotations

import json

import pytest

from services.common.errors import CneiError, ErrorCode


@pytest.mark.parametrize(
    ("key", "text", "reason"),
    [("max_batch_size", "-1", "must be a whole number from 0 to 2147483647"),
     ("max_batch_size", "abc", "must be a whole number"),
     ("max_batch_size", "1.5", "must be a whole number"),
     ("max_batch_size", "2147483648", "must be a whole number from 0 to 2147483647"),
     ("accuracy", "abc", "must be a finite number"),
     ("accuracy", "NaN", "must be a finite number"),
     ("accuracy", "inf", "must be a finite number"),
     ("accuracy", "97.3", "must be a fraction from 0 to 1"),
     ("accuracy", "-0.1", "must be a fraction from 0 to 1"),
     ("labels", "cat,dog", "must be a JSON list of strings"),
     ("labels", '{"0": "cat"}', "must be a JSON list of strings"),
     ("labels", "[0, 1]", "must be a JSON list of strings"),
     ("latency_ms.edge", "fast", "must be a finite number"),
     ("latency_ms.edge", "-2", "must not be negative"),
     ("memory_bytes.edge", "1.5e6", "must be a whole number"),
     ("memory_bytes.edge", "-1", "must be a whole number")],
)
async def test_a_push_with_an_interpreted_key_that_does_not_parse_is_invalid_argument_and_stores_nothing(
        client, name, built, key, text, reason):
    with pytest.raises(CneiError) as info:
        await client.push_file(built["FP32"].path, name, "1", "FP32", metadata={"note": "x", key: text})
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert f"metadata {key}={text!r} {reason}" in str(info.value)
    assert await client.list(name) == []


async def test_every_bad_key_of_a_push_is_named_at_once(client, name, built):
    with pytest.raises(CneiError, match=r"accuracy='x' must be a finite number; max_batch_size='-1' must be") as info:
        await client.push_file(built["FP32"].path, name, "1", "FP32", metadata={"max_batch_size": "-1", "accuracy": "x"})
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


async def test_valid_values_of_every_interpreted_key_are_stored_as_pushed(client, name, built):
    meta = {"max_batch_size": "0", "accuracy": "0.9733", "labels": json.dumps(["cat", "dog"]),
            "latency_ms.edge": "0.5", "memory_bytes.edge": "1000", "note": "anything at all"}
    pushed = await client.push_file(built["FP32"].path, name, "1", "FP32", metadata=meta)
    assert pushed.metadata == meta == (await client.resolve(name, "1", "FP32")).metadata


async def test_pushing_the_same_bytes_again_with_another_value_is_already_exists_and_keeps_the_stored_one(
        client, name, built):
    first = await client.push_file(built["FP32"].path, name, "1", "FP32",
                                   metadata={"max_batch_size": "32", "accuracy": "0.97"})
    with pytest.raises(CneiError) as info:
        await client.push_file(built["FP32"].path, name, "1", "FP32",
                               metadata={"max_batch_size": "64", "accuracy": "0.97", "note": "new"})
    assert info.value.code is ErrorCode.ALREADY_EXISTS
    assert str(info.value) == (
        f"model '{name}' version 1 precision FP32 is already stored with these bytes and other metadata "
        "(max_batch_size: stored '32', pushed '64'; note: stored none, pushed 'new'): push it as a new "
        "version, or delete this one first")
    assert await client.list(name) == [first]


@pytest.mark.parametrize(
    "again",
    [{"max_batch_size": "32", "accuracy": "0.97"}, {"accuracy": "0.97"}, {}],
    ids=["the-same-metadata", "some-of-its-keys", "no-metadata"],
)
async def test_pushing_the_same_bytes_again_with_no_other_value_returns_the_stored_variant(
        client, name, built, again):
    """A retry of a push whose answer was lost."""
    first = await client.push_file(built["FP32"].path, name, "1", "FP32",
                                   metadata={"max_batch_size": "32", "accuracy": "0.97"})
    assert await client.push_file(built["FP32"].path, name, "1", "FP32", metadata=again) == first
    assert await client.list(name) == [first]


async def test_a_retry_carrying_the_measurements_recorded_since_is_no_conflict(client, name, built):
    first = await client.push_file(built["FP32"].path, name, "1", "FP32",
                                   metadata={"accuracy": "0.97", "latency_ms.edge": "9"})
    shown = await client.record_measurement(first, "edge", "edge-1", 1.25, 5000)
    assert shown.metadata["latency_ms.edge"] == "1.2500"
    for metadata in ({"accuracy": "0.97", "latency_ms.edge": "9"}, shown.metadata):
        assert (await client.push_file(built["FP32"].path, name, "1", "FP32", metadata=metadata)).sha256 == first.sha256
    with pytest.raises(CneiError, match=r"latency_ms.edge: stored '1.2500', pushed '3'") as info:
        await client.push_file(built["FP32"].path, name, "1", "FP32", metadata={"latency_ms.edge": "3"})
    assert info.value.code is ErrorCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("latency_ms", "shown"),
    [(float("inf"), "latency_ms=inf"), (float("-inf"), "latency_ms=-inf")],
    ids=["infinite", "minus-infinite"],
)
async def test_a_measurement_of_infinite_latency_is_invalid_argument(client, name, built, latency_ms, shown):
    variant = await client.push_file(built["FP32"].path, name, "1", "FP32")
    with pytest.raises(CneiError, match=shown) as info:
        await client.record_measurement(variant, "edge", "edge-1", latency_ms, 1)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert (await client.resolve(name, "1", "FP32")).metadata == {}
