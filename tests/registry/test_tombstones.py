"""Tombstones of deleted variants (`ListDeleted`): a deletion leaves one per variant (its name,
version, precision, artifact and time) that survives a restart, a push of the same name, version
and precision takes it away, and the registry keeps them `CNEI_REGISTRY_TOMBSTONE_RETENTION_DAYS`
(dropped at each deletion and when it starts, never listed once older). Real registry processes."""
from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest

from services.common.errors import CneiError, ErrorCode
from services.common.model_spec import Tombstone
from services.common.registry_client import RegistryClient
from services.registry.deletion import DAY_S
from tests.registry.restart import across_a_restart
from tests.retrained import write_versions

RETENTION_S = 3.0  # long enough for a deletion and a listing on a loaded machine


@pytest.fixture
def files(tmp_path):
    """Two ONNX files (different bytes, the same tensors) no other test pushes."""
    return write_versions(tmp_path, seed=uuid.uuid4().int % 2**32)


def stored_tombstones(data_dir) -> list[tuple[str, str, str]]:
    """The tombstones' rows in the registry's catalogue, whatever it lists."""
    with sqlite3.connect(data_dir / "catalogue.sqlite3") as db:
        return sorted(db.execute("SELECT name, version, precision FROM tombstones").fetchall())


async def test_a_deletion_leaves_a_tombstone_of_each_variant_naming_its_bytes(client, name, files):
    fp32, int8 = [await client.push_file(path, name, "1", precision)
                  for path, precision in zip(files, ("FP32", "INT8"))]
    await client.push_file(files[1], name, "2", "FP32")
    before = time.time()
    await client.delete(name, "1")
    after = time.time()
    tombstones = await client.deleted(name)
    assert sorted((t.key, t.sha256) for t in tombstones) == sorted((v.key, v.sha256) for v in (fp32, int8))
    assert all(before - 1 <= t.deleted_at <= after + 1 for t in tombstones)
    assert set(tombstones) <= set(await client.deleted())  # every model's
    assert await client.deleted(name, since=after + 60) == []
    assert await client.deleted(f"{name}-other") == []


async def test_listing_the_deleted_since_a_time_that_is_not_a_number_is_invalid_argument(client, name, files):
    await client.push_file(files[0], name, "1", "FP32")
    await client.push_file(files[1], name, "2", "FP32")
    await client.delete(name, "1")
    with pytest.raises(CneiError) as info:
        await client.deleted(name, since=float("nan"))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message == "ListDeleted 'since' must be a number of seconds (Unix time), not nan"


async def test_a_variant_pushed_again_loses_its_tombstone_and_the_others_keep_theirs(client, name, files):
    for precision in ("FP32", "INT8"):
        await client.push_file(files[0], name, "1", precision)
    await client.push_file(files[1], name, "2", "FP32")
    await client.delete(name, "1")
    await client.push_file(files[1], name, "1", "FP32")  # other bytes, the same name, version, precision
    assert [t.key for t in await client.deleted(name)] == [f"{name}:1:INT8"]


async def test_tombstones_survive_a_restart(launch_registry, tmp_path, files):
    async def write(client: RegistryClient) -> list[Tombstone]:
        for version, path in zip("12", files):
            await client.push_file(path, "m", version, "FP32")
        await client.delete("m", "1")
        return await client.deleted("m")

    async def check(client: RegistryClient, written: list[Tombstone]) -> None:
        assert len(written) == 1 and await client.deleted("m") == written

    await across_a_restart(launch_registry, tmp_path / "data", write, check)


async def test_tombstones_older_than_the_retention_are_never_listed_and_are_dropped(launch_registry, tmp_path,
                                                                                   files):
    data = tmp_path / "data"
    launch = functools.partial(launch_registry, CNEI_REGISTRY_TOMBSTONE_RETENTION_DAYS=str(RETENTION_S / DAY_S))
    registry = await asyncio.to_thread(launch, data)
    client = RegistryClient(registry.target, timeout=10)
    try:
        for version in "123":
            await client.push_file(files[int(version) % 2], "m", version, "FP32")
        await client.delete("m", "1")
        assert [t.key for t in await client.deleted("m")] == ["m:1:FP32"]
        await asyncio.sleep(RETENTION_S + 0.5)
        assert await client.deleted("m") == [] and stored_tombstones(data) == [("m", "1", "FP32")]
        await client.delete("m", "2")  # a deletion drops the tombstones past the retention
        assert stored_tombstones(data) == [("m", "2", "FP32")]
    finally:
        await client.close()
        await asyncio.to_thread(registry.proc.terminate)
        await asyncio.to_thread(registry.proc.wait, 20)
    await asyncio.sleep(RETENTION_S + 0.5)
    await asyncio.to_thread(launch, data)  # and a registry starting does
    assert stored_tombstones(data) == []


async def test_listing_the_deleted_is_a_restricted_metadata_api(launch_registry, tmp_path):
    registry = await asyncio.to_thread(launch_registry, tmp_path / "data",
                                       CNEI_REGISTRY_RESTRICTED_APIS="metadata:read-key=r")
    keyless, keyed = RegistryClient(registry.target), RegistryClient(registry.target, headers=[("read-key", "r")])
    try:
        with pytest.raises(CneiError) as refused:
            await keyless.deleted()
        assert refused.value.code is ErrorCode.PERMISSION_DENIED, refused.value.message
        assert "metadata API is restricted" in refused.value.message
        assert await keyed.deleted() == []
    finally:
        await keyless.close()
        await keyed.close()


@pytest.mark.parametrize(("variable", "value"), [
    ("CNEI_REGISTRY_TOMBSTONE_RETENTION_DAYS", "0"), ("CNEI_REGISTRY_TOMBSTONE_RETENTION_DAYS", "-1"),
    ("CNEI_REGISTRY_CONCURRENT_CHECKS", "0"), ("CNEI_REGISTRY_CONCURRENT_CHECKS", "-1"),
], ids=["no-tombstone-kept", "negative-retention", "no-check-at-once", "negative-checks"])
def test_a_registry_set_to_keep_no_tombstone_or_run_no_check_does_not_start_naming_the_setting(
        tmp_path, variable, value):
    env = {**os.environ, "CNEI_REGISTRY_DATA_DIR": str(tmp_path / "data"), "CNEI_REGISTRY_PORT": "0",
           "CNEI_REGISTRY_METRICS_PORT": "0", variable: value}
    out = subprocess.run([sys.executable, "-m", "services.registry"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and variable in out.stderr
