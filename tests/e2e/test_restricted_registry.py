"""Restricted APIs of the registry and the trainer (`CNEI_REGISTRY_RESTRICTED_APIS`,
`CNEI_TRAINER_RESTRICTED_APIS`): pushing models and starting jobs (`model-repository`) and reading
the repository (`metadata`) need their header; the command line sends `--header`, and a runtime
whose `CNEI_RUNTIME_REGISTRY_HEADERS` holds the key pulls and serves models from such a registry."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.common.errors import CneiError, ErrorCode
from services.common.registry_client import RegistryClient
from tests.e2e.processes import run_cnei, spawn, start_runtime

SPEC = "model-repository:admin-key=s3cret;metadata:read-key=r"
ADMIN, READ = "admin-key=s3cret", "read-key=r"
MODEL = "digits-sec"


def _cnei(*args: str) -> subprocess.CompletedProcess:
    return run_cnei(*args, env={"CNEI_HEADERS": None})  # only the headers each call is given


@pytest.fixture(scope="module")
def registry(mesh, tmp_path_factory):
    port = infra.free_port()
    proc = spawn("services.registry", {**os.environ,
        "CNEI_REGISTRY_PORT": str(port), "CNEI_REGISTRY_METRICS_PORT": "0",
        "CNEI_REGISTRY_DATA_DIR": str(tmp_path_factory.mktemp("restricted-registry")),
        "CNEI_REGISTRY_NATS_URL": mesh.settings.nats_url, "CNEI_REGISTRY_RESTRICTED_APIS": SPEC}, port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        infra.stop(proc)


def test_pushing_and_reading_need_their_headers(registry, digits_models):
    fp32 = next(v for v in digits_models if v.precision == "FP32")
    push = ("models", "push", str(fp32.path), "--name", MODEL, "--version", "1", "--registry", registry,
            "--meta", f"accuracy={fp32.metadata['accuracy']}")
    denied = _cnei(*push)
    assert denied.returncode == 2, denied.stdout
    assert "PERMISSION_DENIED" in denied.stderr and "the model-repository API is restricted" in denied.stderr
    assert "admin-key" in denied.stderr and "s3cret" not in denied.stderr  # the value is never echoed
    pushed = _cnei(*push, "--header", ADMIN)
    assert pushed.returncode == 0 and f"registered {MODEL} v1 FP32" in pushed.stdout, pushed.stderr

    unread = _cnei("models", "list", "--registry", registry, "--header", ADMIN)  # another category's key
    assert unread.returncode == 2 and "the metadata API is restricted: send header 'read-key'" in unread.stderr
    listed = _cnei("models", "list", "--registry", registry, "--header", READ)
    assert listed.returncode == 0 and MODEL in listed.stdout, listed.stderr

    async def fetch(headers):  # a response stream (FetchArtifact) is refused the same way
        client = RegistryClient(registry, headers=headers)
        try:
            variant = await client.resolve(MODEL, "", "FP32") if headers else None
            return await client.fetch_artifact(variant.sha256 if variant else "0" * 64)
        finally:
            await client.close()
    with pytest.raises(CneiError) as caught:
        asyncio.run(fetch([]))
    assert caught.value.code is ErrorCode.PERMISSION_DENIED and "metadata API is restricted" in caught.value.message
    assert asyncio.run(fetch([("read-key", "r")])) == fp32.path.read_bytes()


def test_a_push_refused_while_its_chunks_are_still_going_is_told_permission_denied(registry, tmp_path):
    # grpc-python's asyncio client reports a write that fails because the server already answered
    # as INTERNAL "Internal error from Core" (grpc/grpc#36066): the refusal waits for the upload
    big = tmp_path / "big.onnx"
    big.write_bytes(os.urandom(8 << 20))  # 8 chunks

    async def pushes():
        client = RegistryClient(registry)
        codes = []
        try:
            for _ in range(25):
                try:
                    await client.push_file(big, MODEL, "9")
                except CneiError as exc:
                    codes.append((exc.code, "the model-repository API is restricted" in exc.message))
        finally:
            await client.close()
        return codes
    codes = asyncio.run(pushes())
    assert codes == [(ErrorCode.PERMISSION_DENIED, True)] * 25


def test_a_runtime_holding_the_key_pulls_and_serves_and_one_without_is_told_why(registry, mesh, tmp_path):
    keyed, keyed_port = start_runtime(mesh, "edge-sec1", "site-sec", tmp_path, CNEI_RUNTIME_REGISTRY_TARGET=registry,
                                      CNEI_RUNTIME_PRELOAD="", CNEI_RUNTIME_REGISTRY_HEADERS=f"{ADMIN};{READ}")
    keyless, keyless_port = start_runtime(mesh, "edge-sec2", "site-sec", tmp_path,
                                          CNEI_RUNTIME_REGISTRY_TARGET=registry, CNEI_RUNTIME_PRELOAD="")
    try:
        tensor = triton.InferInput("input", [2, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((2, 64), np.float32))
        client = triton.InferenceServerClient(f"127.0.0.1:{keyed_port}")
        assert client.infer(MODEL, [tensor], client_timeout=60).as_numpy("probabilities").shape == (2, 10)
        client.close()
        client = triton.InferenceServerClient(f"127.0.0.1:{keyless_port}")
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [tensor], client_timeout=60)
        client.close()
        assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "registry" in caught.value.message() and "metadata API is restricted" in caught.value.message()
    finally:
        infra.stop(keyed)
        infra.stop(keyless)


def test_a_bad_restriction_stops_the_registry_naming_the_variable():
    env = {**os.environ, "CNEI_REGISTRY_PORT": str(infra.free_port()), "CNEI_REGISTRY_RESTRICTED_APIS": "inference:k=v"}
    out = subprocess.run([sys.executable, "-m", "services.registry"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert "CNEI_REGISTRY_RESTRICTED_APIS" in out.stderr and "unknown category 'inference'" in out.stderr
    assert "metadata, model-repository" in out.stderr


def test_starting_a_federated_job_needs_the_trainer_s_key_and_reading_jobs_stays_open(mesh, tmp_path):
    port = infra.free_port()
    proc = spawn("services.trainer", {**os.environ,
        "CNEI_TRAINER_PORT": str(port), "CNEI_TRAINER_METRICS_PORT": "0",
        "CNEI_TRAINER_REGISTRY_TARGET": mesh.registry, "CNEI_TRAINER_REDIS_URL": mesh.settings.redis_url,
        "CNEI_TRAINER_NATS_URL": mesh.settings.nats_url, "CNEI_TRAINER_DATA_DIR": str(tmp_path / "trainer"),
        "CNEI_TRAINER_RESTRICTED_APIS": "model-repository:admin-key=s3cret"}, port)
    try:
        trainer = f"127.0.0.1:{port}"
        listed = _cnei("train", "list", "--trainer", trainer)
        assert listed.returncode == 0, listed.stderr
        start = ("train", "start", "--model", "no-such-model", "--trainer", trainer)
        denied = _cnei(*start)
        assert denied.returncode == 2 and "PERMISSION_DENIED" in denied.stderr
        assert "the model-repository API is restricted: send header 'admin-key'" in denied.stderr
        passed = _cnei(*start, "--header", ADMIN)  # past the guard: the trainer itself answers
        assert passed.returncode == 2 and "NOT_FOUND" in passed.stderr and "no-such-model" in passed.stderr
    finally:
        infra.stop(proc)
