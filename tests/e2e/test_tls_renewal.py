"""Renewed TLS files are taken without a restart (cert-manager, a Kubernetes Secret volume): a
runtime and a coordinator (its front door on and off) serving mutual TLS, then every file swapped
for ones of another CA. New connections to the servers get the renewed certificates and only
clients of the new CA get in (gRPC, the fast lane, REST); the coordinator's own connections to
the runtime, opened anew once the runtime restarts, present its renewed client certificate; live
files that do not load leave the front door on its last good ones. A
runtime's registry client, likewise, pulls from a registry on mutual TLS after both swap their
files and the registry restarts (on its last good files while they are half renewed)."""
from __future__ import annotations

import asyncio
import os
import shutil
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.common import tls
from services.common.errors import Unavailable
from services.common.fastlane import FastClient
from services.common.registry_client import RegistryClient
from services.coordinator.door_process import BUILT
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.processes import digits_payload, spawn, start_coordinator, start_fast_runtime, start_runtime
from tests.pki import make_pki

REGION = "site-renew"
# {live file name: the PKI entry it holds}: what the runtime and the coordinator are configured with
LIVE = {"server.pem": "cert", "server.key": "key", "ca.pem": "ca", "client.pem": "client_cert", "client.key": "client_key"}


@pytest.fixture(scope="module")
def pkis(tmp_path_factory) -> tuple[dict, dict]:
    old, new = tmp_path_factory.mktemp("pki-old"), tmp_path_factory.mktemp("pki-new")
    return make_pki(old), make_pki(new)


def _install(live: Path, pki: dict) -> None:
    """Every live file replaced by the PKI's, each by a rename (a new inode, as a Secret volume's swap)."""
    for name, entry in LIVE.items():
        shutil.copyfile(pki[entry], live / f".{name}.tmp")
        os.replace(live / f".{name}.tmp", live / name)


def _client(address: str, pki: dict) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(address, ssl=True, root_certificates=pki["ca"],
                                        certificate_chain=pki["client_cert"], private_key=pki["client_key"])


def _served_by(address: str, pki: dict) -> tuple[str, bool]:
    """One digits request placed in REGION on a new connection: (node, through the front door)."""
    client = _client(address, pki)
    try:
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
        params = client.infer("digits", [tensor], parameters={"region": REGION},
                              client_timeout=20).get_response().parameters
        return params["cnei_node"].string_param, "cnei_front_door" in params and params["cnei_front_door"].bool_param
    finally:
        client.close()


def _serving(address: str, pki: dict, door: str) -> bool:
    """edge-renew answers through the coordinator (and its door, when on) for a client of `pki`."""
    try:
        return _served_by(address, pki) == ("edge-renew", door == "on")
    except InferenceServerException:
        return False


def _refused(address: str, pki: dict) -> bool:
    try:
        _served_by(address, pki)
    except InferenceServerException as exc:
        return exc.status() == "StatusCode.UNAVAILABLE"
    return False


def _grpc_ready(address: str, pki: dict) -> bool:
    credentials = tls.channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
    with grpc.secure_channel(address, credentials) as channel:
        try:
            return pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        except grpc.RpcError:
            return False


def _fast_ok(address: str, pki: dict) -> bool:
    async def call() -> bytes:
        client = FastClient(address, connect_timeout=5.0,
                            ssl_context=tls.client_ssl_context(pki["ca"], pki["client_cert"], pki["client_key"]))
        try:
            return await client.call(digits_payload(), 10.0)
        finally:
            await client.close()
    try:
        return pb.ModelInferResponse.FromString(asyncio.run(call())).model_name == "digits"
    except Unavailable:
        return False


def _https_ok(port: int, pki: dict) -> bool:
    context = tls.client_ssl_context(pki["ca"], pki["client_cert"], pki["client_key"])
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/health/ready", timeout=5, context=context) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("door", ["on", "off"])
def test_renewed_certificates_and_cas_are_taken_without_a_restart(mesh, pkis, door, tmp_path):
    if door == "on" and not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    old, new = pkis
    live = tmp_path / "live"
    live.mkdir()
    _install(live, old)
    runtime_env = {"CNEI_RUNTIME_TLS_CERT_FILE": str(live / "server.pem"),
                   "CNEI_RUNTIME_TLS_KEY_FILE": str(live / "server.key"),
                   "CNEI_RUNTIME_TLS_CLIENT_CA_FILE": str(live / "ca.pem")}
    runtime, grpc_address, fast_address = start_fast_runtime(mesh, "edge-renew", REGION, tmp_path, **runtime_env)
    coordinator = None
    try:
        coordinator, address, http_port, _ = start_coordinator(
            mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR=door,
            CNEI_COORDINATOR_TLS_CERT_FILE=str(live / "server.pem"), CNEI_COORDINATOR_TLS_KEY_FILE=str(live / "server.key"),
            CNEI_COORDINATOR_TLS_CLIENT_CA_FILE=str(live / "ca.pem"),
            CNEI_COORDINATOR_NODE_TLS_CA_FILE=str(live / "ca.pem"), CNEI_COORDINATOR_NODE_TLS_CERT_FILE=str(live / "client.pem"),
            CNEI_COORDINATOR_NODE_TLS_KEY_FILE=str(live / "client.key"))
        infra.wait_until(lambda: _serving(address, old, door), 30, "edge-renew serving through the coordinator over TLS")

        _install(live, new)
        # the servers: new connections get the renewed certificate; the old CA's clients are refused
        infra.wait_until(lambda: _grpc_ready(grpc_address, new), 10, "the runtime's gRPC port on the new files")
        assert not _grpc_ready(grpc_address, old)
        infra.wait_until(lambda: _fast_ok(fast_address, new), 10, "the runtime's fast lane on the new files")
        assert not _fast_ok(fast_address, old)
        infra.wait_until(lambda: _https_ok(http_port, new), 10, "the coordinator's REST port on the new files")
        assert not _https_ok(http_port, old)
        infra.wait_until(lambda: not _refused(address, new), 10, "the coordinator's gRPC port on the new files")
        assert _refused(address, old)
        # the coordinator's own clients of the runtime take the renewed CA (within about a second)
        infra.wait_until(lambda: _serving(address, new, door), 10, "edge-renew serving on the new files")

        # the runtime restarts on its ports: the coordinator (and its door) connect anew, with the
        # renewed client certificate the runtime's new client CA requires
        infra.stop(runtime)
        runtime, _, _ = start_fast_runtime(mesh, "edge-renew", REGION, tmp_path, int(grpc_address.rsplit(":", 1)[1]),
                                           int(fast_address.rsplit(":", 1)[1]), **runtime_env)
        infra.wait_until(lambda: _serving(address, new, door), 30,
                         "edge-renew serving through the coordinator again, on renewed client certificates")
    finally:
        if coordinator is not None:
            infra.stop(coordinator)
        infra.stop(runtime)


HALF_WRITTEN = b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUYb\n"  # a write caught halfway


@pytest.mark.parametrize("name, broken", [
    ("server.pem", lambda pki: HALF_WRITTEN),
    ("server.key", lambda pki: Path(pki["client_key"]).read_bytes()),  # a key that is not the certificate's
    ("ca.pem", lambda pki: HALF_WRITTEN),
], ids=["a half-written certificate", "a key not the certificate's", "a half-written client CA"])
def test_the_front_door_keeps_serving_its_last_good_files_while_the_live_ones_do_not_load(
        mesh, pkis, name, broken, tmp_path):
    if not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    old, new = pkis
    live = tmp_path / "live"
    live.mkdir()
    _install(live, old)
    coordinator, address, _, _ = start_coordinator(
        mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="on",
        CNEI_COORDINATOR_TLS_CERT_FILE=str(live / "server.pem"), CNEI_COORDINATOR_TLS_KEY_FILE=str(live / "server.key"),
        CNEI_COORDINATOR_TLS_CLIENT_CA_FILE=str(live / "ca.pem"))
    try:
        infra.wait_until(lambda: _grpc_ready(address, old), 30, "the front door serving TLS")
        (live / f".{name}.tmp").write_bytes(broken(old))
        os.replace(live / f".{name}.tmp", live / name)
        time.sleep(3 * tls.RELOAD_CHECK_S)  # the coordinator, then its door, have looked at the files
        assert all(_grpc_ready(address, old) for _ in range(3))  # new connections, the old certificate

        _install(live, new)  # good files again: taken within seconds
        infra.wait_until(lambda: _grpc_ready(address, new), 10, "the front door on the renewed files")
        assert not _grpc_ready(address, old)
    finally:
        infra.stop(coordinator)


def _start_registry(mesh, data_dir: Path, port: int, live: Path):
    """A registry on `port` serving mutual TLS from the live files (clients of their CA only)."""
    return spawn("services.registry", {
        **os.environ, "CNEI_REGISTRY_PORT": str(port), "CNEI_REGISTRY_METRICS_PORT": "0",
        "CNEI_REGISTRY_DATA_DIR": str(data_dir), "CNEI_REGISTRY_NATS_URL": mesh.settings.nats_url,
        "CNEI_REGISTRY_TLS_CERT_FILE": str(live / "server.pem"), "CNEI_REGISTRY_TLS_KEY_FILE": str(live / "server.key"),
        "CNEI_REGISTRY_TLS_CLIENT_CA_FILE": str(live / "ca.pem")}, port)


def _push(address: str, path: Path, names: list[str], pki: dict) -> None:
    async def go() -> None:
        client = RegistryClient(address, timeout=10.0, credentials=tls.channel_credentials(
            pki["ca"], pki["client_cert"], pki["client_key"]))
        try:
            for name in names:
                await client.push_file(path, name, "1", "FP32")
        finally:
            await client.close()
    asyncio.run(go())


def _runtime_serves(port: int, model: str) -> bool:
    """The runtime answers `model` (pulled from its registry the first time)."""
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
        return client.infer(model, [tensor], client_timeout=20).as_numpy("probabilities").shape == (1, 10)
    except InferenceServerException:
        return False
    finally:
        client.close()


def test_a_runtime_s_registry_client_takes_renewed_client_certificates_and_cas_without_a_restart(
        mesh, pkis, digits_models, tmp_path):
    old, new = pkis
    live = tmp_path / "live"
    live.mkdir()
    _install(live, old)
    port = infra.free_port()
    address = f"127.0.0.1:{port}"
    registry = _start_registry(mesh, tmp_path / "registry", port, live)
    runtime = None
    try:
        fp32 = next(b for b in digits_models if b.precision == "FP32")
        _push(address, fp32.path, ["renew-before", "renew-half", "renew-after"], old)
        runtime, runtime_port = start_runtime(
            mesh, "edge-registry-renew", "site-registry-renew", tmp_path, CNEI_RUNTIME_PRELOAD="",
            CNEI_RUNTIME_REGISTRY_TARGET=address, CNEI_RUNTIME_REGISTRY_TLS_CA_FILE=str(live / "ca.pem"),
            CNEI_RUNTIME_REGISTRY_TLS_CERT_FILE=str(live / "client.pem"),
            CNEI_RUNTIME_REGISTRY_TLS_KEY_FILE=str(live / "client.key"))
        assert _runtime_serves(runtime_port, "renew-before")

        # half renewed (the new client certificate, the old key), and the registry restarts: the
        # runtime connects again on its last good files
        shutil.copyfile(new["client_cert"], live / ".client.pem.tmp")
        os.replace(live / ".client.pem.tmp", live / "client.pem")
        infra.stop(registry)
        registry = _start_registry(mesh, tmp_path / "registry", port, live)
        time.sleep(2 * tls.RELOAD_CHECK_S)  # the runtime's next call looks at its files
        infra.wait_until(lambda: _runtime_serves(runtime_port, "renew-half"), 15,
                         "the runtime pulling from the registry on its last good client certificate")

        # the registry's certificate and client CA and the runtime's client certificate and CA are
        # all renewed from another CA; the registry restarts on them, so the runtime's connection
        # ends and only a client presenting the renewed certificate gets in
        _install(live, new)
        infra.stop(registry)
        registry = _start_registry(mesh, tmp_path / "registry", port, live)
        infra.wait_until(lambda: _runtime_serves(runtime_port, "renew-after"), 15,
                         "the runtime pulling from the registry on its renewed client certificate and CA")
    finally:
        if runtime is not None:
            infra.stop(runtime)
        infra.stop(registry)
