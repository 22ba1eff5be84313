"""Deleting a model version (`DeleteModel`, `cnei model delete`): refused while requests go to it,
NOT_FOUND when absent; the artifacts and kept deltas no variant refers to any more go with it, a
push of the same bytes meanwhile keeps its artifact, and the deletion is announced. A real
registry process (and, for the race, a real gRPC registry server over a store the test holds)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import nats
import pytest

from services.common import events
from services.common.deployment import DeploymentSpec, EnsembleStep, JointSpec, RolloutSpec
from services.common.errors import CneiError, ErrorCode
from services.common.registry_client import RegistryClient
from services.registry.core import Registry
from services.registry.store import RegistryStore
from tests.registry.conftest import serving
from tests.retrained import write_versions


@pytest.fixture
def files(tmp_path):
    """Two ONNX files (different bytes, the same tensors) no other test pushes."""
    return write_versions(tmp_path, seed=uuid.uuid4().int % 2**32)


@pytest.fixture
async def two_versions(client, name, files):
    """Versions 1 and 2 (FP32) of a fresh model, from different files."""
    return [await client.push_file(path, name, version, "FP32") for version, path in zip("12", files)]


def blob(registry, sha256: str):
    return registry.data_dir / "artifacts" / "sha256" / sha256[:2] / sha256


async def refused_with(client, code: ErrorCode, name: str, version: str, precision: str = "") -> str:
    with pytest.raises(CneiError) as info:
        await client.delete(name, version, precision)
    assert info.value.code is code, info.value.message
    return info.value.message


async def test_deleting_a_version_removes_its_variants_artifact_and_deltas(client, registry, two_versions, files):
    v1, v2 = two_versions
    await client.pull_artifact(v2.sha256, {v1.sha256: files[0]})  # a delta v1 -> v2 is kept
    delta = registry.data_dir / "artifacts" / "deltas" / f"{v1.sha256}-{v2.sha256}"
    assert delta.is_file()
    deleted, freed = await client.delete(v1.name, "1")
    assert [v.key for v in deleted] == [v1.key] and freed == v1.size_bytes
    assert [v.version for v in await client.list(v1.name)] == ["2"]
    assert not blob(registry, v1.sha256).exists() and not delta.exists()
    assert blob(registry, v2.sha256).is_file()
    assert (await client.pull_artifact(v2.sha256)).data == files[1].read_bytes()
    assert "not found" in await refused_with(client, ErrorCode.NOT_FOUND, v1.name, "1")
    with pytest.raises(CneiError) as info:
        await client.pull_artifact(v1.sha256)
    assert info.value.code is ErrorCode.NOT_FOUND


async def test_an_artifact_another_variant_refers_to_is_kept(client, registry, name, files):
    for version, precision in (("1", "FP32"), ("1", "INT8"), ("2", "FP32")):
        kept = await client.push_file(files[0], name, version, precision)
    deleted, freed = await client.delete(name, "1", "int8")
    assert [v.key for v in deleted] == [f"{name}:1:INT8"] and freed == 0
    assert sorted(v.key for v in await client.list(name)) == [f"{name}:1:FP32", f"{name}:2:FP32"]
    assert blob(registry, kept.sha256).is_file()


@pytest.mark.parametrize(("deployments", "version", "why"), [
    (lambda m: [DeploymentSpec(m, rollout=RolloutSpec("1"))], "1", "its deployment pins it as the stable version"),
    (lambda m: [DeploymentSpec(m, rollout=RolloutSpec("2", "1", 10.0))], "1", "its deployment's canary"),
    (lambda m: [DeploymentSpec(m)], "2", "its deployment serves it as the latest version"),
    (lambda m: [DeploymentSpec(f"{m}-pipe", ensemble=(EnsembleStep(m, "1", ("input=x",), ("probabilities=y",)),))],
     "1", "ensemble '{m}-pipe' step 0 runs it"),
    (lambda m: [DeploymentSpec(f"{m}-pipe", ensemble=(EnsembleStep(m, "", ("input=x",), ("probabilities=y",)),))],
     "2", "ensemble '{m}-pipe' step 0 runs it"),
    (lambda m: [DeploymentSpec(f"{m}-edge", joint=JointSpec(mode="sync", cloud_model=m, cloud_version="1"))],
     "1", "the deployment of model '{m}-edge' runs it as its joint cloud model"),
], ids=["pinned-stable", "canary", "latest-of-an-unpinned-deployment", "ensemble-step", "ensemble-step-latest",
        "joint-cloud-model"])
async def test_a_version_in_use_is_not_deleted(client, two_versions, files, deployments, version, why):
    model = two_versions[0].name
    await client.push_file(files[0], f"{model}-edge", "1", "FP32")
    for spec in deployments(model):
        await client.put_deployment(spec)
    message = await refused_with(client, ErrorCode.FAILED_PRECONDITION, model, version)
    assert f"model '{model}' version {version} is in use: {why.format(m=model)}" in message
    assert sorted(v.version for v in await client.list(model)) == ["1", "2"]


async def test_a_version_no_request_goes_to_is_deleted_beside_a_pinned_one(client, two_versions):
    model = two_versions[0].name
    await client.put_deployment(DeploymentSpec(model, rollout=RolloutSpec("1")))
    assert [v.version for v in (await client.delete(model, "2"))[0]] == ["2"]


@pytest.mark.parametrize(("version", "precision", "code"), [
    ("9", "", ErrorCode.NOT_FOUND), ("1", "INT8", ErrorCode.NOT_FOUND), ("", "", ErrorCode.INVALID_ARGUMENT),
    ("1", "FP8", ErrorCode.INVALID_ARGUMENT)], ids=["absent-version", "absent-precision", "no-version", "bad-precision"])
async def test_deleting_what_is_not_there_or_is_not_named_is_refused(client, two_versions, version, precision, code):
    await refused_with(client, code, two_versions[0].name, version, precision)
    assert len(await client.list(two_versions[0].name)) == 2


async def test_deleting_a_version_of_an_ensemble_says_it_is_one_and_has_none(client, two_versions):
    """An ensemble is a deployment over models, not a model: NOT_FOUND 'version 1 not found' would
    deny what its metadata (version 1, as Triton's) shows; the request does not fit what it names."""
    model = two_versions[0].name
    name = f"{model}-pipe"
    await client.put_deployment(DeploymentSpec(name, ensemble=(
        EnsembleStep(model, "1", ("input=x",), ("probabilities=y",)),
        EnsembleStep(model, "2", ("input=x",), ("probabilities=z",)))))
    for precision in ("", "FP32"):
        message = await refused_with(client, ErrorCode.FAILED_PRECONDITION, name, "1", precision)
        assert message == (f"'{name}' is an ensemble (a deployment), not a model: it has no versions to delete; "
                           f"the versions it runs are its steps' models' ('{model}'), each deleted under its own name")
    assert sorted(v.version for v in await client.list(model)) == ["1", "2"]


async def test_a_deletion_is_announced(nats_server, client, two_versions):
    nc = await nats.connect(nats_server, connect_timeout=5)
    try:
        sub = await nc.subscribe(events.MODEL_DELETED)
        await nc.flush(timeout=5)
        await client.delete(two_versions[0].name, "1")
        envelope = events.decode((await sub.next_msg(timeout=5)).data)
    finally:
        await nc.close()
    assert (envelope.type, envelope.source, envelope.payload) == (
        events.MODEL_DELETED, "registry", {"name": two_versions[0].name, "version": "1", "precisions": ["FP32"]})


def test_cnei_model_delete_deletes_a_version_and_says_what_it_freed(registry, client, two_versions):
    v1 = two_versions[0]
    out = subprocess.run([sys.executable, "-m", "services.cli.main", "model", "delete", v1.name, "1",
                          "--registry", registry.target], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"deleted {v1.key} ({v1.size_bytes} bytes of artifacts freed)" in out.stdout
    again = subprocess.run([sys.executable, "-m", "services.cli.main", "model", "delete", v1.name, "1",
                            "--registry", registry.target], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "NOT_FOUND" in again.stderr


class PausingStore(RegistryStore):
    """Pauses a deletion once its artifacts are gone, still holding the store lock."""

    def __init__(self, data_dir):
        super().__init__(data_dir)
        self.deleting, self.release = threading.Event(), threading.Event()

    def _drop_deltas(self, referenced):
        self.deleting.set()
        self.release.wait(20)
        super()._drop_deltas(referenced)


async def test_a_push_of_the_same_bytes_while_they_are_deleted_keeps_its_artifact(tmp_path, files):
    store = PausingStore(tmp_path / "data")
    async with serving(Registry(store)) as address:
        client = RegistryClient(address)
        try:
            v1 = await client.push_file(files[0], "m", "1", "FP32")
            await client.push_file(files[1], "m", "2", "FP32")
            deleting = asyncio.create_task(client.delete("m", "1"))
            await asyncio.to_thread(store.deleting.wait, 20)
            pushing = asyncio.create_task(client.push_file(files[0], "m", "3", "FP32"))
            await asyncio.sleep(0.3)  # its upload in, waiting for the store
            store.release.set()
            await deleting
            v3 = await pushing
            assert v3.sha256 == v1.sha256 and store.has_blob(v3.sha256)
            assert (await client.pull_artifact(v3.sha256)).data == files[0].read_bytes()
        finally:
            store.release.set()
            await client.close()
    store.close()


# --- deployments stored under older rules, which no longer read -------------------------------------
def store_as_an_older_registry(data_dir, model: str, spec_json: str) -> None:
    """A deployment row written straight into the catalogue, as a registry with older rules stored it."""
    with contextlib.closing(sqlite3.connect(data_dir / "catalogue.sqlite3")) as db, db:
        db.execute("INSERT OR REPLACE INTO deployments VALUES (?, ?, ?)", (model, spec_json, time.time()))


def _nan(spec: dict) -> str:
    return json.dumps({**spec, "attempt_timeout_ms": float("nan")})  # accepted before NaN was checked


STEP = {"inputs": ["input=x"], "outputs": ["probabilities=y"]}
UNREADABLE = [  # (id, deployment stored: its model, its JSON; the model its deletion's refusal names, or None)
    ("its-own-deployment", lambda m: (m, _nan({"model": m, "rollout": {"stable": "1"}})), "as its model"),
    ("an-ensemble-step", lambda m: (f"{m}-pipe", _nan({"model": f"{m}-pipe", "ensemble": [
        {"model": m, "version": "2", **STEP}]})), "in an ensemble step"),
    ("a-joint-cloud-model", lambda m: (f"{m}-edge", _nan({"model": f"{m}-edge", "joint": {
        "mode": "sync", "cloud_model": m, "cloud_version": "2"}})), "as its joint cloud model"),
    ("another-model-s", lambda m: (f"{m}-edge", _nan({"model": f"{m}-edge"})), None),
    ("another-ensemble-s", lambda m: (f"{m}-pipe", _nan({"model": f"{m}-pipe", "ensemble": [
        {"model": f"{m}-edge", **STEP}]})), None),
]


@pytest.mark.parametrize(("stored", "names_it"), [case[1:] for case in UNREADABLE], ids=[c[0] for c in UNREADABLE])
async def test_a_deployment_that_no_longer_reads_blocks_only_the_deletions_of_models_it_names(
        launch_registry, tmp_path, files, stored, names_it):
    """It cannot tell which versions it runs, so the models it still names keep theirs; others are free."""
    registry = await asyncio.to_thread(launch_registry, tmp_path / "data")
    client = RegistryClient(registry.target, timeout=10.0)
    try:
        for name, version, path in (("m", "1", files[0]), ("m", "2", files[1]), ("m-edge", "1", files[0])):
            await client.push_file(path, name, version, "FP32")
        model, spec_json = stored("m")
        store_as_an_older_registry(registry.data_dir, model, spec_json)
        if names_it is None:
            assert [v.key for v in (await client.delete("m", "1"))[0]] == ["m:1:FP32"]
            return
        message = await refused_with(client, ErrorCode.FAILED_PRECONDITION, "m", "1")
        assert message.startswith(f"model 'm' version 1 may be in use: the stored deployment of model '{model}' "
                                  f"names it {names_it} but no longer reads (deployment field")
        assert message.endswith(f"put a valid deployment of '{model}' (cnei deploy apply) or delete it "
                                f"(cnei deploy delete {model})")
        assert sorted(v.version for v in await client.list("m")) == ["1", "2"]
    finally:
        await client.close()


@pytest.mark.parametrize("spec_json", [
    "{not JSON", json.dumps({"attempt_timeout_ms": 2000.0}),
    json.dumps({"model": "other", "ensemble": "m"}), json.dumps({"model": "other", "joint": {"cloud_model": 7}}),
], ids=["not-json", "no-model", "steps-not-a-list", "cloud-model-not-a-name"])
async def test_a_deployment_that_cannot_be_read_at_all_blocks_every_deletion_naming_it_and_the_fix(
        launch_registry, tmp_path, files, spec_json):
    registry = await asyncio.to_thread(launch_registry, tmp_path / "data")
    client = RegistryClient(registry.target, timeout=10.0)
    try:
        await client.push_file(files[0], "m", "1", "FP32")
        store_as_an_older_registry(registry.data_dir, "other", spec_json)
        message = await refused_with(client, ErrorCode.FAILED_PRECONDITION, "m", "1")
        assert message.startswith("model 'm' version 1 may be in use: the stored deployment of model 'other' "
                                  "no longer reads (")
        assert message.endswith(") and what it runs cannot be told; put a valid deployment of 'other' "
                                "(cnei deploy apply) or delete it (cnei deploy delete other)")
        await client.delete_deployment("other")
        assert [v.key for v in (await client.delete("m", "1"))[0]] == ["m:1:FP32"]
    finally:
        await client.close()
