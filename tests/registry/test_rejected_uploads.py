"""What a push that does not make it leaves behind: nothing. A refused push keeps no artifact
(nothing to fetch, no disk used), and an upload cut off by a registry that was killed is removed
when the next one starts. A real registry process."""
from __future__ import annotations

import asyncio
import hashlib
import signal

import grpc
import numpy as np
import pytest

from services.common.errors import CneiError, ErrorCode
from services.models.onnx_mlp import mlp_graph
from services.pb.cnei import registry_pb2 as rpb
from services.pb.cnei import registry_pb2_grpc as rpb_grpc


def _unique_artifact(seed: int) -> bytes:
    """A tiny valid ONNX model no other test pushes (an artifact hash of its own)."""
    weights = np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32)
    return mlp_graph([weights], [np.zeros(3, np.float32)], name="tiny").SerializeToString()


def _blob(registry, data: bytes):
    sha = hashlib.sha256(data).hexdigest()
    return registry.data_dir / "artifacts" / "sha256" / sha[:2] / sha


async def _fetch(stub, data: bytes) -> grpc.StatusCode:
    request = rpb.FetchArtifactRequest(sha256=hashlib.sha256(data).hexdigest())
    try:
        [chunk async for chunk in stub.FetchArtifact(request, timeout=5)]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _chunks(name: str, data: bytes, hold: asyncio.Event | None = None):
    """A push of `data` as `name` version 1 FP32; with `hold`, the second half waits for it."""
    yield rpb.PushModelChunk(header=rpb.PushModelHeader(name=name, version="1", precision="FP32"))
    yield rpb.PushModelChunk(data=data[: len(data) // 2])
    if hold is not None:
        await hold.wait()
    yield rpb.PushModelChunk(data=data[len(data) // 2:])


async def test_a_push_refused_as_already_existing_keeps_no_artifact(client, stub, registry, name, tmp_path):
    kept, refused = _unique_artifact(1), _unique_artifact(2)
    (tmp_path / "kept.onnx").write_bytes(kept)
    (tmp_path / "refused.onnx").write_bytes(refused)
    await client.push_file(tmp_path / "kept.onnx", name, "1", "FP32")
    for _ in range(3):
        with pytest.raises(CneiError, match=f"model '{name}' version 1 precision FP32 already exists") as info:
            await client.push_file(tmp_path / "refused.onnx", name, "1", "FP32")
        assert info.value.code is ErrorCode.ALREADY_EXISTS
    assert not _blob(registry, refused).exists()
    assert await _fetch(stub, refused) == grpc.StatusCode.NOT_FOUND
    assert await _fetch(stub, kept) == grpc.StatusCode.OK
    assert list((registry.data_dir / "incoming").iterdir()) == []


async def test_a_push_refused_at_its_header_while_its_chunks_are_still_going_is_told_why(client, name, tmp_path):
    # grpc-python's asyncio client reports a write that fails because the server already answered
    # as INTERNAL "Internal error from Core" (grpc/grpc#36066): the refusal waits for the upload
    big = tmp_path / "big.onnx"
    big.write_bytes(bytes(8 << 20))  # 8 chunks
    codes = []
    for _ in range(25):
        with pytest.raises(CneiError) as info:
            await client.push_file(big, name, "1", "FP64")
        codes.append((info.value.code, "precision" in info.value.message))
    assert codes == [(ErrorCode.INVALID_ARGUMENT, True)] * 25


async def test_of_two_pushes_of_one_variant_at_once_the_loser_keeps_no_artifact(stub, registry, name):
    """Both are past the check made when the header arrives; the one catalogued second is
    refused there, and its artifact goes."""
    artifacts = [_unique_artifact(3), _unique_artifact(4)]
    hold = asyncio.Event()
    calls = [asyncio.ensure_future(stub.PushModel(_chunks(name, data, hold), timeout=20)) for data in artifacts]
    await asyncio.sleep(1.0)  # both headers (and first halves) are in
    hold.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [data for data, r in zip(artifacts, results) if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 1, results
    [loser] = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert loser.code() == grpc.StatusCode.ALREADY_EXISTS
    [winner] = [data for data in artifacts if data is not refused[0]]
    assert not _blob(registry, refused[0]).exists()
    assert await _fetch(stub, refused[0]) == grpc.StatusCode.NOT_FOUND
    assert await _fetch(stub, winner) == grpc.StatusCode.OK


async def test_an_upload_cut_off_by_a_killed_registry_is_removed_when_the_next_one_starts(launch_registry,
                                                                                          tmp_path):
    first = await asyncio.to_thread(launch_registry, tmp_path / "data")
    incoming = first.data_dir / "incoming"
    hold = asyncio.Event()  # never set: the upload stays half sent
    async with grpc.aio.insecure_channel(first.target) as channel:
        call = asyncio.ensure_future(rpb_grpc.ModelRegistryStub(channel).PushModel(
            _chunks("cut-off", _unique_artifact(5), hold), timeout=30))
        for _ in range(100):
            if list(incoming.iterdir()):
                break
            await asyncio.sleep(0.05)
        assert [p.suffix for p in incoming.iterdir()] == [".part"]
        first.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.proc.wait)
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    assert len(list(incoming.iterdir())) == 1  # what kill -9 left
    await asyncio.to_thread(launch_registry, tmp_path / "data")
    assert list(incoming.iterdir()) == []
