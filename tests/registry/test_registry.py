"""The registry as a real process: push, list, get, resolve, fetch, durability and events."""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from pathlib import Path

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import events
from services.common.errors import CneiError, ErrorCode
from services.common.model_spec import TensorSpec
from services.common.registry_client import RegistryClient
from services.common.registry_convert import variant_from_proto
from services.pb.cnei import registry_pb2 as rpb
from tests.registry.restart import across_a_restart

DIGITS_INPUTS = [TensorSpec("input", "FP32", (-1, 64))]
DIGITS_OUTPUTS = [TensorSpec("probabilities", "FP32", (-1, 10))]


@pytest.fixture(scope="module")
def catalogue(registry, built) -> str:
    """One model with versions 1 (FP32, FP16, INT8), 2 (FP16, INT8), 9 (FP32) and 10 (INT8)."""
    model = f"cat-{uuid.uuid4().hex[:8]}"
    layout = {"1": ["FP32", "FP16", "INT8"], "2": ["FP16", "INT8"], "9": ["FP32"], "10": ["INT8"]}

    async def push_all() -> None:
        client = RegistryClient(registry.target)
        try:
            for version, precisions in layout.items():
                for precision in precisions:
                    await client.push_file(built[precision].path, model, version, precision)
        finally:
            await client.close()

    asyncio.run(push_all())
    return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _incoming(registry) -> list[Path]:
    return list((registry.data_dir / "incoming").iterdir())


async def test_the_registry_reports_serving_on_the_standard_health_service(registry):
    async with grpc.aio.insecure_channel(registry.target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=registry.service), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_pushed_model_comes_back_with_its_file_hash_and_onnx_signature(client, stub, name, built):
    fp32 = built["FP32"]
    before = time.time()
    pushed = await client.push_file(fp32.path, name, "1", "FP32", metadata=fp32.metadata)
    assert (pushed.name, pushed.version, pushed.precision, pushed.format) == (name, "1", "FP32", "onnx")
    assert pushed.sha256 == _sha256(fp32.path)
    assert pushed.size_bytes == fp32.path.stat().st_size
    assert pushed.inputs == DIGITS_INPUTS
    assert pushed.outputs == DIGITS_OUTPUTS
    assert pushed.metadata == fp32.metadata
    assert before - 1 <= pushed.created_at <= time.time() + 1
    got = await stub.GetModel(rpb.ModelRef(name=name, version="1", precision="FP32"), timeout=5)
    assert variant_from_proto(got) == pushed


async def test_a_lower_case_precision_is_stored_upper_case(client, stub, name, built):
    pushed = await client.push_file(built["FP16"].path, name, "1", "fp16")
    assert pushed.precision == "FP16"
    got = await stub.GetModel(rpb.ModelRef(name=name, version="1", precision="fp16"), timeout=5)
    assert got.precision == "FP16"


async def test_get_model_without_a_precision_means_fp32(client, stub, name, built):
    await client.push_file(built["FP32"].path, name, "1", "FP32")
    got = await stub.GetModel(rpb.ModelRef(name=name, version="1"), timeout=5)
    assert got.precision == "FP32"


async def test_fetching_an_artifact_returns_the_pushed_bytes(client, name, built):
    int8 = built["INT8"]
    pushed = await client.push_file(int8.path, name, "1", "INT8")
    assert await client.fetch_artifact(pushed.sha256) == int8.path.read_bytes()


async def test_the_same_file_under_two_versions_is_stored_once(client, registry, name, built):
    blobs = registry.data_dir / "artifacts" / "sha256"
    first = await client.push_file(built["FP32"].path, name, "1", "FP32")
    stored = sorted(blobs.rglob("*"))
    second = await client.push_file(built["FP32"].path, name, "2", "FP32")
    assert first.sha256 == second.sha256
    assert sorted(blobs.rglob("*")) == stored
    assert (blobs / first.sha256[:2] / first.sha256).read_bytes() == built["FP32"].path.read_bytes()


async def test_listing_one_model_gives_its_variants_in_version_then_precision_order(client, catalogue):
    listed = [(v.version, v.precision) for v in await client.list(catalogue)]
    assert listed == [("1", "FP16"), ("1", "FP32"), ("1", "INT8"), ("2", "FP16"), ("2", "INT8"),
                      ("9", "FP32"), ("10", "INT8")]


async def test_listing_everything_includes_every_model(client, catalogue, name, built):
    await client.push_file(built["FP32"].path, name, "1", "FP32")
    names = {v.name for v in await client.list()}
    assert {catalogue, name} <= names


async def test_listing_an_unknown_model_is_empty(client, name):
    assert await client.list(name) == []


@pytest.mark.parametrize(
    ("version", "precision", "expected"),
    [
        ("", "", ("10", "INT8")),
        ("", "FP32", ("9", "FP32")),
        ("", "fp16", ("2", "FP16")),
        ("1", "", ("1", "FP32")),
        ("2", "", ("2", "FP16")),
        ("1", "INT8", ("1", "INT8")),
        ("9", "", ("9", "FP32")),
    ],
    ids=["latest-version-whatever-its-precision", "latest-with-fp32", "lower-case-precision",
         "fp32-is-the-default", "fp16-before-int8", "explicit-both", "numeric-not-lexical"],
)
async def test_resolve_picks_the_latest_version_then_fp32_fp16_int8(client, catalogue, version, precision, expected):
    got = await client.resolve(catalogue, version, precision)
    assert (got.version, got.precision) == expected


@pytest.mark.parametrize(
    ("version", "precision", "message"),
    [("3", "", "version 3 not found"), ("9", "INT8", "version 9 precision INT8 not found"),
     ("", "FP64", "precision FP64 not found")],
)
async def test_resolve_of_a_missing_version_or_precision_is_not_found(client, catalogue, version, precision, message):
    with pytest.raises(CneiError, match=message) as info:
        await client.resolve(catalogue, version, precision)
    assert info.value.code is ErrorCode.NOT_FOUND


async def test_resolving_an_unknown_model_is_not_found(client, name):
    with pytest.raises(CneiError, match=f"model '{name}' not found") as info:
        await client.resolve(name)
    assert info.value.code is ErrorCode.NOT_FOUND


async def test_getting_an_unregistered_variant_is_not_found(client, stub, name, built):
    await client.push_file(built["FP32"].path, name, "1", "FP32")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetModel(rpb.ModelRef(name=name, version="1", precision="INT8"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == f"model '{name}' version 1 precision INT8 not found"


async def test_fetching_an_unknown_artifact_is_not_found(client):
    with pytest.raises(CneiError, match=f"artifact sha256:{'0' * 64} not found") as info:
        await client.fetch_artifact("0" * 64)
    assert info.value.code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize("sha256", ["not-a-digest", "", "0" * 63, "../../etc/passwd"])
async def test_fetching_by_something_that_is_not_a_sha256_is_invalid_argument(client, sha256):
    with pytest.raises(CneiError, match=f"artifact digest {sha256!r} is not a sha256") as info:
        await client.fetch_artifact(sha256)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


async def test_an_artifact_is_fetched_by_its_digest_as_listed_or_in_capitals(client, stub, name, built):
    pushed = await client.push_file(built["FP32"].path, name, "1", "FP32")
    data = built["FP32"].path.read_bytes()
    for asked in (f"sha256:{pushed.sha256}", pushed.sha256.upper()):
        chunks = [c async for c in stub.FetchArtifact(rpb.FetchArtifactRequest(sha256=asked), timeout=10)]
        assert b"".join(c.data for c in chunks) == data


async def test_pushing_the_same_name_version_and_precision_twice_is_already_exists(client, name, built):
    await client.push_file(built["FP32"].path, name, "1", "FP32")
    with pytest.raises(CneiError, match=f"model '{name}' version 1 precision FP32 already exists") as info:
        await client.push_file(built["INT8"].path, name, "1", "FP32")
    assert info.value.code is ErrorCode.ALREADY_EXISTS
    assert (await client.resolve(name, "1", "FP32")).sha256 == _sha256(built["FP32"].path)


async def test_pushing_the_same_artifact_as_the_same_variant_again_returns_the_stored_one(client, name, built):
    """A retry of a push whose answer was lost."""
    first = await client.push_file(built["FP32"].path, name, "1", "FP32", metadata={"note": "first"})
    assert await client.push_file(built["FP32"].path, name, "1", "FP32", metadata={"note": "first"}) == first
    assert await client.list(name) == [first]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda onnx_bytes: random.Random(7).randbytes(4096), "artifact is not a valid ONNX model"),
        (lambda onnx_bytes: onnx_bytes[: len(onnx_bytes) // 2], "artifact is not a valid ONNX model"),
        (lambda onnx_bytes: onnx_bytes[:-1], "artifact is not a valid ONNX model"),
        (lambda onnx_bytes: b"", "artifact is empty"),
    ],
    ids=["random-bytes", "truncated-half", "truncated-last-byte", "empty"],
)
async def test_a_corrupt_artifact_is_invalid_argument_and_leaves_nothing_behind(
    client, registry, name, built, tmp_path, content, message
):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content(built["FP32"].path.read_bytes()))
    with pytest.raises(CneiError, match=message) as info:
        await client.push_file(bad, name, "1", "FP32")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert await client.list(name) == []
    assert _incoming(registry) == []


async def test_an_artifact_over_the_size_limit_is_resource_exhausted(client, registry, name, tmp_path):
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\x00" * (registry.max_artifact_bytes + 1))
    with pytest.raises(CneiError, match=f"exceeds the {registry.max_artifact_bytes}-byte limit") as info:
        await client.push_file(big, name, "1", "FP32")
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert _incoming(registry) == []


@pytest.mark.parametrize(
    ("model", "version", "precision", "message"),
    [
        ("../etc", "1", "FP32", "model name '../etc' must match"),
        ("", "1", "FP32", "model name '' must match"),
        ("a" * 129, "1", "FP32", "model name 'a+' must match"),
        ("-leading-dash", "1", "FP32", "model name '-leading-dash' must match"),
        ("digits", "", "FP32", "model version '' must match"),
        ("digits", "1 2", "FP32", "model version '1 2' must match"),
        ("digits", "1", "FP8", r"precision 'FP8' must be one of \['FP32', 'FP16', 'INT8'\]"),
        ("digits", "1", "BF16", "precision 'BF16' must be one of"),
    ],
)
async def test_a_bad_name_version_or_precision_is_invalid_argument(client, built, model, version, precision, message):
    with pytest.raises(CneiError, match=message) as info:
        await client.push_file(built["FP32"].path, model, version, precision)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def _header(name: str, fmt: str = "onnx") -> rpb.PushModelChunk:
    return rpb.PushModelChunk(header=rpb.PushModelHeader(name=name, version="1", precision="FP32", format=fmt))


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        (lambda name, data: [rpb.PushModelChunk(data=data)], "PushModel stream must start with a header chunk"),
        (lambda name, data: [], "PushModel stream must start with a header chunk"),
        (lambda name, data: [_header(name), rpb.PushModelChunk(data=data), _header(name)],
         "PushModel stream has a second header"),
        (lambda name, data: [_header(name, "pytorch"), rpb.PushModelChunk(data=data)],
         "format 'pytorch' is not supported"),
    ],
    ids=["data-first", "empty-stream", "second-header", "unsupported-format"],
)
async def test_a_malformed_push_stream_is_invalid_argument(stub, client, name, built, chunks, message):
    data = built["FP32"].path.read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PushModel(iter(chunks(name, data)), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert await client.list(name) == []


async def test_pushing_a_version_publishes_a_model_published_event(nats_server, client, name, built):
    nc = await nats.connect(nats_server, connect_timeout=5)
    try:
        sub = await nc.subscribe(events.MODEL_PUBLISHED)
        await nc.flush(timeout=5)
        pushed = await client.push_file(built["INT8"].path, name, "3", "INT8")
        envelope = events.decode((await sub.next_msg(timeout=5)).data)
        stored = await nc.jetstream(timeout=5).get_last_msg(events.STREAM, events.MODEL_PUBLISHED)
    finally:
        await nc.close()
    assert (envelope.type, envelope.source) == (events.MODEL_PUBLISHED, "registry")
    assert envelope.payload == {
        "name": name, "version": "3", "precision": "INT8",
        "sha256": _sha256(built["INT8"].path), "size_bytes": pushed.size_bytes,
    }
    assert events.decode(stored.data) == envelope


async def test_a_restarted_registry_still_lists_and_serves_everything(launch_registry, tmp_path, built):
    async def write(client):
        for version, precision in [("1", "FP32"), ("1", "INT8"), ("2", "FP16")]:
            await client.push_file(built[precision].path, "durable", version, precision,
                                   metadata={"note": f"v{version}"})
        return await client.list()

    async def check(client, before):
        assert await client.list() == before
        assert (await client.resolve("durable")).version == "2"
        for variant in before:
            assert await client.fetch_artifact(variant.sha256) == built[variant.precision].path.read_bytes()
        with pytest.raises(CneiError) as info:
            await client.push_file(built["INT8"].path, "durable", "1", "FP32")
        assert info.value.code is ErrorCode.ALREADY_EXISTS

    await across_a_restart(launch_registry, tmp_path / "data", write, check)