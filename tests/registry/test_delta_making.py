"""Many nodes asking at once for a new version as a delta against the one they hold (each told of
it by cnei.model.published): the delta is made once, and while it is being made the registry
answers its other calls at once. A real gRPC registry server whose delta making waits for the
test."""
from __future__ import annotations

import asyncio
import os
import threading

from services.common import delta
from services.common.registry_client import RegistryClient
from services.registry.core import Registry
from services.registry.store import RegistryStore
from tests.registry.conftest import serving
from tests.retrained import write_versions

PULLS = min(32, (os.cpu_count() or 1) + 4) + 2  # more than the threads of asyncio's default executor


async def test_while_a_delta_many_nodes_await_is_made_the_registry_answers_other_calls_at_once(tmp_path, monkeypatch):
    making, release, made = threading.Event(), threading.Event(), []
    encode = delta.encode

    def held_encode(base: bytes, target: bytes, *args) -> bytes:
        made.append(len(target))
        making.set()
        release.wait(30)
        return encode(base, target, *args)

    monkeypatch.setattr(delta, "encode", held_encode)
    store = RegistryStore(tmp_path / "data")
    v1_file, v2_file = write_versions(tmp_path)
    async with serving(Registry(store)) as address:
        client, quick = RegistryClient(address), RegistryClient(address, timeout=2.0)
        try:
            v1 = await client.push_file(v1_file, "m", "1")
            v2 = await client.push_file(v2_file, "m", "2")
            pulls = [asyncio.ensure_future(client.pull_artifact(v2.sha256, {v1.sha256: v1_file}))
                     for _ in range(PULLS)]
            assert await asyncio.to_thread(making.wait, 10)
            await asyncio.sleep(0.5)  # the other pulls wait for it
            assert (await quick.resolve("m")).version == "2"
            assert [v.version for v in await quick.list("m")] == ["1", "2"]
            assert not any(p.done() for p in pulls)
            release.set()
            pulled = await asyncio.gather(*pulls)
        finally:
            release.set()
            await quick.close()
            await client.close()
    store.close()
    assert made == [v2.size_bytes]
    assert {(p.base, p.data) for p in pulled} == {(v1.sha256, v2_file.read_bytes())}
