"""The registry on TLS (and mutual TLS): clients trusting its CA push, list and pull; plaintext
and untrusted clients are refused; an edge runtime given the CA pulls and serves from it; the
CLI's registry commands take --tls-ca; a TLS setting without its pair stops the registry."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.common import tls
from services.common.errors import CneiError, ErrorCode
from services.common.registry_client import RegistryClient
from tests.e2e.processes import run_cnei, spawn, start_runtime



def _registry(mesh, folder, **env: str) -> tuple[subprocess.Popen, str]:
    port = infra.free_port()
    proc = spawn("services.registry", {**os.environ, "CNEI_REGISTRY_PORT": str(port), "CNEI_REGISTRY_METRICS_PORT": "0",
                                       "CNEI_REGISTRY_DATA_DIR": str(folder), "CNEI_REGISTRY_NATS_URL": mesh.settings.nats_url,
                                       **env}, port)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tls_registry(mesh, pki, tmp_path_factory):
    proc, address = _registry(mesh, tmp_path_factory.mktemp("tls-registry"),
                              CNEI_REGISTRY_TLS_CERT_FILE=pki["cert"], CNEI_REGISTRY_TLS_KEY_FILE=pki["key"])
    try:
        yield address
    finally:
        infra.stop(proc)


def _list(address: str, credentials=None) -> list[str]:
    async def go():
        client = RegistryClient(address, timeout=5.0, credentials=credentials)
        try:
            return [f"{v.name}:{v.version}:{v.precision}" for v in await client.list()]
        finally:
            await client.close()
    return asyncio.run(go())


def _push(address: str, path, name: str, credentials) -> None:
    async def go():
        client = RegistryClient(address, timeout=10.0, credentials=credentials)
        try:
            await client.push_file(path, name, "1", "FP32")
        finally:
            await client.close()
    asyncio.run(go())


def test_clients_trusting_the_ca_are_served_and_others_refused(tls_registry, pki, digits_models):
    fp32 = next(b for b in digits_models if b.precision == "FP32")
    _push(tls_registry, fp32.path, "tls-digits", tls.channel_credentials(pki["ca"]))
    assert "tls-digits:1:FP32" in _list(tls_registry, tls.channel_credentials(pki["ca"]))
    for credentials in (None, tls.channel_credentials(pki["other_ca"])):  # plaintext; another CA
        with pytest.raises(CneiError) as refused:
            _list(tls_registry, credentials)
        assert refused.value.code is ErrorCode.UNAVAILABLE


def test_an_edge_runtime_given_the_ca_pulls_and_serves_from_the_tls_registry(mesh, tls_registry, pki, digits_models,
                                                                               tmp_path):
    fp32 = next(b for b in digits_models if b.precision == "FP32")
    _push(tls_registry, fp32.path, "tls-served", tls.channel_credentials(pki["ca"]))
    proc, port = start_runtime(mesh, "edge-tls1", "site-tls", tmp_path, CNEI_RUNTIME_PRELOAD="",
                               CNEI_RUNTIME_REGISTRY_TARGET=tls_registry, CNEI_RUNTIME_REGISTRY_TLS_CA_FILE=pki["ca"])
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = triton.InferInput("input", [2, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((2, 64), np.float32))
        probabilities = client.infer("tls-served", [tensor], client_timeout=30).as_numpy("probabilities")
        assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    finally:
        client.close()
        infra.stop(proc)


def test_the_cli_s_registry_commands_take_the_ca(tls_registry, pki, tmp_path, digits_models):
    """--tls-ca, else $CNEI_REGISTRY_TLS_CA; a coordinator's $CNEI_TLS_CA is not the registry's."""
    _push(tls_registry, next(b for b in digits_models if b.precision == "FP32").path, "tls-cli",
          tls.channel_credentials(pki["ca"]))
    clean = {"CNEI_REGISTRY_TLS_CA": None, "CNEI_TLS_CA": None}
    listed = run_cnei("models", "list", "--registry", tls_registry, "--tls-ca", pki["ca"], env=clean, timeout=60)
    assert listed.returncode == 0 and "tls-cli" in listed.stdout, listed.stderr
    spec = tmp_path / "deploy.yaml"
    spec.write_text("model: tls-cli\n")
    applied = run_cnei("deploy", "apply", str(spec), "--registry", tls_registry,
                       env={**clean, "CNEI_REGISTRY_TLS_CA": pki["ca"]}, timeout=60)
    assert applied.returncode == 0, applied.stderr
    for env in (clean, {**clean, "CNEI_TLS_CA": pki["ca"]}):
        plain = run_cnei("models", "list", "--registry", tls_registry, env=env, timeout=60)
        assert plain.returncode != 0 and "UNAVAILABLE" in plain.stderr


def test_mutual_tls_serves_only_clients_with_a_certificate_the_client_ca_signed(mesh, pki, tmp_path):
    proc, address = _registry(mesh, tmp_path / "mtls", CNEI_REGISTRY_TLS_CERT_FILE=pki["cert"],
                              CNEI_REGISTRY_TLS_KEY_FILE=pki["key"], CNEI_REGISTRY_TLS_CLIENT_CA_FILE=pki["ca"])
    try:
        assert _list(address, tls.channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])) == []
        with pytest.raises(CneiError):
            _list(address, tls.channel_credentials(pki["ca"]))  # no client certificate
    finally:
        infra.stop(proc)


@pytest.mark.parametrize(("module", "env", "named"), [
    ("services.registry", {"CNEI_REGISTRY_TLS_CERT_FILE": "x.pem"}, "CNEI_REGISTRY_TLS_KEY_FILE"),
    ("services.edge_runtime", {"CNEI_RUNTIME_REGISTRY_TLS_CA_FILE": "/no/such/ca.pem"},
     "CNEI_RUNTIME_REGISTRY_TLS_CA_FILE"),
    ("services.trainer", {"CNEI_TRAINER_REGISTRY_TLS_CERT_FILE": "c.pem"}, "CNEI_TRAINER_REGISTRY_TLS_CA_FILE"),
])
def test_a_registry_tls_setting_that_cannot_work_stops_the_service_naming_it(module, env, named):
    out = subprocess.run([sys.executable, "-m", module], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and named in out.stderr, out.stderr[-500:]
