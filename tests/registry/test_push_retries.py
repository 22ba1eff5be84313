"""A push whose call ends (the client's deadline) while the registry catalogues it: the version is
stored and announced all the same, and the client's retry of the same artifact gets it back. A
real gRPC registry server whose catalogue commit waits for the test (a slow disk)."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from services.common import events
from services.common.errors import CneiError, ErrorCode
from services.common.registry_client import RegistryClient
from services.models.onnx_mlp import mlp_graph
from services.pb.cnei import registry_pb2 as rpb
from services.pb.cnei import registry_pb2_grpc as rpb_grpc
from services.registry.core import Registry
from services.registry.store import RegistryStore
from tests.registry.conftest import serving


class HeldStore(RegistryStore):
    """Commits a variant to the catalogue only once `release` is set."""

    def __init__(self, data_dir):
        super().__init__(data_dir)
        self.committing, self.release = threading.Event(), threading.Event()

    def _insert(self, v):
        self.committing.set()
        self.release.wait(20)
        super()._insert(v)


@dataclass
class Held:
    """A registry server on a HeldStore: a client, a stub, the store and the events published."""

    client: RegistryClient
    stub: rpb_grpc.ModelRegistryStub
    store: HeldStore
    published: list[tuple[str, dict]]


@pytest.fixture
async def held(tmp_path):
    store, published = HeldStore(tmp_path / "data"), []

    async def publish(subject: str, payload: dict) -> None:
        published.append((subject, payload))

    async with serving(Registry(store, publish)) as address:
        client, channel = RegistryClient(address), grpc.aio.insecure_channel(address)
        yield Held(client, rpb_grpc.ModelRegistryStub(channel), store, published)
        store.release.set()
        await channel.close()
        await client.close()
    store.close()


def _artifact(path, seed: int):
    weights = np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32)
    path.write_bytes(mlp_graph([weights], [np.zeros(3, np.float32)], name="tiny").SerializeToString())
    return path


async def test_a_push_cut_off_while_catalogued_is_announced_and_its_retry_gets_the_stored_version(held, tmp_path):
    client, published = held.client, held.published
    artifact = _artifact(tmp_path / "m.onnx", 1)
    with pytest.raises(grpc.aio.AioRpcError) as cut_off:
        await held.stub.PushModel(iter([rpb.PushModelChunk(header=rpb.PushModelHeader(name="m", version="1")),
                                        rpb.PushModelChunk(data=artifact.read_bytes())]), timeout=1.0)
    assert cut_off.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and held.store.committing.is_set()
    held.store.release.set()
    for _ in range(100):
        if published:
            break
        await asyncio.sleep(0.05)
    [stored] = await client.list("m")
    assert published == [(events.MODEL_PUBLISHED, {"name": "m", "version": "1", "precision": "FP32",
                                                   "sha256": stored.sha256, "size_bytes": stored.size_bytes})]
    assert await client.push_file(artifact, "m", "1") == stored
    assert await client.list("m") == [stored]
    with pytest.raises(CneiError, match="model 'm' version 1 precision FP32 already exists") as info:
        await client.push_file(_artifact(tmp_path / "other.onnx", 2), "m", "1")
    assert info.value.code is ErrorCode.ALREADY_EXISTS
