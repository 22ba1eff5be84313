"""A node that holds another version of a model pulls the new one as a delta against it: few
bytes on the wire, the exact artifact after decoding, and the whole artifact whenever the delta
cannot be used."""
from __future__ import annotations

import shutil

import grpc
import pytest

from services.pb.cnei import registry_pb2 as rpb
from tests.retrained import write_versions


@pytest.fixture
async def versions(client, name, tmp_path):
    v1_file, v2_file = write_versions(tmp_path)
    v1 = await client.push_file(v1_file, name, "1", "FP32")
    v2 = await client.push_file(v2_file, name, "2", "FP32")
    return (v1, v1_file), (v2, v2_file)


async def test_a_node_holding_version_1_pulls_version_2_as_a_small_delta(client, registry, versions):
    (v1, v1_file), (v2, v2_file) = versions
    pulled = await client.pull_artifact(v2.sha256, {v1.sha256: v1_file})
    assert pulled.data == v2_file.read_bytes() and pulled.base == v1.sha256
    assert pulled.wire_bytes < 0.1 * v2.size_bytes, f"{pulled.wire_bytes} of {v2.size_bytes} bytes"
    kept = registry.data_dir / "artifacts" / "deltas" / f"{v1.sha256}-{v2.sha256}"
    assert kept.stat().st_size == pulled.wire_bytes  # made once, sent from disk next time
    again = await client.pull_artifact(v2.sha256, {v1.sha256: v1_file})
    assert again == pulled


@pytest.mark.parametrize("held", ["nothing", "another-model", "the-artifact-itself"])
async def test_without_another_version_of_the_model_the_artifact_comes_whole(client, versions, built, held):
    (v1, _), (v2, v2_file) = versions
    if held == "another-model":
        other = await client.push_file(built["FP32"].path, f"{v1.name}-other", "1", "FP32")
        offered = {other.sha256: built["FP32"].path}
    else:
        offered = {} if held == "nothing" else {v2.sha256: v2_file}
    pulled = await client.pull_artifact(v2.sha256, offered)
    assert (pulled.data, pulled.base, pulled.wire_bytes) == (v2_file.read_bytes(), "", v2.size_bytes)


async def test_a_delta_that_would_save_too_little_is_not_sent_and_not_made_again(client, registry, versions, built):
    (v1, v1_file), _ = versions
    unlike = await client.push_file(built["FP32"].path, v1.name, "3", "FP32")  # another network entirely
    pulled = await client.pull_artifact(unlike.sha256, {v1.sha256: v1_file})
    assert (pulled.base, pulled.wire_bytes) == ("", unlike.size_bytes)
    marker = registry.data_dir / "artifacts" / "deltas" / f"{v1.sha256}-{unlike.sha256}"
    assert marker.is_file() and marker.stat().st_size == 0  # remembered: not made for the next node


async def test_a_node_offering_more_bases_than_the_limit_offers_its_likeliest(client, versions):
    (v1, v1_file), (v2, v2_file) = versions
    held = {v1.sha256: v1_file, **{f"{i:064x}": v1_file for i in range(300)}}
    pulled = await client.pull_artifact(v2.sha256, held)
    assert pulled.base == v1.sha256 and pulled.data == v2_file.read_bytes()


async def test_a_base_that_changed_on_the_node_costs_a_whole_fetch_not_a_wrong_model(client, versions, tmp_path):
    (v1, v1_file), (v2, v2_file) = versions
    damaged = tmp_path / "damaged.onnx"
    shutil.copy(v1_file, damaged)
    with damaged.open("r+b") as fh:
        fh.seek(200)
        fh.write(b"\xff" * 16)
    pulled = await client.pull_artifact(v2.sha256, {v1.sha256: damaged})
    assert pulled.data == v2_file.read_bytes() and pulled.base == ""
    assert pulled.wire_bytes > v2.size_bytes  # the delta, then the artifact


async def test_have_lists_are_bounded_and_bad_entries_ignored(stub, versions):
    (v1, _), (v2, _) = versions
    chunks = [c async for c in stub.FetchArtifact(rpb.FetchArtifactRequest(
        sha256=v2.sha256, have=["not-a-sha", v1.sha256.upper(), v1.sha256]), timeout=10)]
    assert chunks[0].encoding == "delta" and chunks[0].base_sha256 == v1.sha256
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.FetchArtifact(rpb.FetchArtifactRequest(sha256=v2.sha256, have=["0" * 64] * 300), timeout=10).read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 256" in refused.value.details()
