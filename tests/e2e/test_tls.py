"""TLS on the coordinator's public ports (Triton's --grpc-use-ssl and mutual TLS), with and
without its front door: tritonclient over TLS trusting the CA is served, plaintext and untrusted
clients are refused, REST serves HTTPS, and with a client CA only clients with a certificate it
signed get in."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.common import tls
from services.coordinator.door_process import BUILT
from tests.e2e.processes import run_cnei, run_perf_analyzer, start_coordinator



def _infer(address: str, **client_kwargs) -> np.ndarray:
    client = triton.InferenceServerClient(address, **client_kwargs)
    try:
        tensor = triton.InferInput("input", [2, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((2, 64), np.float32))
        return client.infer("digits", [tensor], client_timeout=20).as_numpy("probabilities")
    finally:
        client.close()


def _refused(address: str, **client_kwargs) -> None:
    with pytest.raises(InferenceServerException) as caught:
        _infer(address, **client_kwargs)
    assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value


def _start(mesh, door: str, **env: str):
    if door == "on" and not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    proc, address, http_port, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR=door, **env)
    return proc, address, http_port


def _ready(address: str, **client_kwargs) -> bool:
    client = triton.InferenceServerClient(address, **client_kwargs)
    try:
        return client.is_server_ready()
    except InferenceServerException:
        return False
    finally:
        client.close()


@pytest.mark.parametrize("door", ["on", "off"])
def test_the_public_ports_serve_tls_and_refuse_plaintext_and_untrusted_clients(mesh, pki, door):
    proc, address, http_port = _start(mesh, door, CNEI_COORDINATOR_TLS_CERT_FILE=pki["cert"],
                                      CNEI_COORDINATOR_TLS_KEY_FILE=pki["key"])
    try:
        trusted = {"ssl": True, "root_certificates": pki["ca"]}
        infra.wait_until(lambda: _ready(address, **trusted), 30, "the coordinator ready over TLS")
        for _ in range(3):  # the door's fast path too, once it knows the route
            assert _infer(address, **trusted).shape == (2, 10)
        _refused(address)  # plaintext
        _refused(address, ssl=True, root_certificates=pki["other_ca"])  # a server it cannot trust

        context = tls.client_ssl_context(pki["ca"])
        with urllib.request.urlopen(f"https://127.0.0.1:{http_port}/v2/health/ready", timeout=10,
                                    context=context) as reply:
            assert reply.status == 200
        with urllib.request.urlopen(f"https://127.0.0.1:{http_port}/v2", timeout=10, context=context) as reply:
            assert json.loads(reply.read())["name"] == "cnei-coordinator"
        with pytest.raises(OSError):  # plaintext HTTP to the HTTPS port: no answer (URLError is an OSError)
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2", timeout=10)

        out = run_cnei("infer", "digits", "--digits", "2", "--url", address, env={"CNEI_TLS_CA": pki["ca"]}, timeout=60)
        assert out.returncode == 0 and "top-1: [0, 1]" in out.stdout, out.stderr
        health = subprocess.run([sys.executable, "-m", "services.cli.healthcheck", address, "--tls-ca", pki["ca"]],
                                capture_output=True, text=True, timeout=30)
        assert health.returncode == 0, health.stderr
        if door == "on":  # Triton's own client over TLS, through the door's fast path
            report = run_perf_analyzer("digits", address, "--ssl-grpc-use-ssl", "true",
                                       "--ssl-grpc-root-certifications-file", pki["ca"])
            assert float(re.search(r"throughput: ([0-9.]+) infer/sec", report).group(1)) > 0
    finally:
        infra.stop(proc)


@pytest.mark.parametrize("door", ["on", "off"])
def test_mutual_tls_serves_only_clients_whose_certificate_the_client_ca_signed(mesh, pki, door):
    proc, address, http_port = _start(mesh, door, CNEI_COORDINATOR_TLS_CERT_FILE=pki["cert"],
                                      CNEI_COORDINATOR_TLS_KEY_FILE=pki["key"],
                                      CNEI_COORDINATOR_TLS_CLIENT_CA_FILE=pki["ca"])
    try:
        with_cert = {"ssl": True, "root_certificates": pki["ca"], "certificate_chain": pki["client_cert"],
                     "private_key": pki["client_key"]}
        infra.wait_until(lambda: _ready(address, **with_cert), 30, "the coordinator ready over mutual TLS")
        assert _infer(address, **with_cert).shape == (2, 10)
        _refused(address, ssl=True, root_certificates=pki["ca"])  # no client certificate
        context = tls.client_ssl_context(pki["ca"], pki["client_cert"], pki["client_key"])
        with urllib.request.urlopen(f"https://127.0.0.1:{http_port}/v2", timeout=10, context=context) as reply:
            assert reply.status == 200
        with pytest.raises(OSError):  # no client certificate: the handshake fails
            urllib.request.urlopen(f"https://127.0.0.1:{http_port}/v2", timeout=10,
                                   context=tls.client_ssl_context(pki["ca"]))
    finally:
        infra.stop(proc)


def test_a_tls_setting_without_its_pair_or_file_stops_the_coordinator_naming_it(mesh, pki):
    for env, message in (({"CNEI_COORDINATOR_TLS_CERT_FILE": pki["cert"]}, "CNEI_COORDINATOR_TLS_KEY_FILE is needed"),
                         ({"CNEI_COORDINATOR_TLS_CERT_FILE": "/nonexistent.pem", "CNEI_COORDINATOR_TLS_KEY_FILE":
                           pki["key"]}, "CNEI_COORDINATOR_TLS_CERT_FILE: no such file '/nonexistent.pem'")):
        out = subprocess.run([sys.executable, "-m", "services.coordinator"], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and message in out.stderr, out.stderr
