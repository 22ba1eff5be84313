"""The Trainer API on TLS: `cnei train` trusting its CA (--tls-ca or $CNEI_TRAINER_TLS_CA) lists
jobs, a plaintext client and a coordinator's $CNEI_TLS_CA are refused, and a TLS setting without
its pair stops the trainer naming it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.cli import infra
from tests.e2e.processes import run_cnei, spawn



@pytest.fixture(scope="module")
def tls_trainer(mesh, pki, tmp_path_factory):
    port = infra.free_port()
    proc = spawn("services.trainer", {
        **os.environ, "CNEI_TRAINER_PORT": str(port), "CNEI_TRAINER_METRICS_PORT": "0",
        "CNEI_TRAINER_REGISTRY_TARGET": mesh.registry, "CNEI_TRAINER_REDIS_URL": mesh.settings.redis_url,
        "CNEI_TRAINER_NATS_URL": mesh.settings.nats_url,
        "CNEI_TRAINER_DATA_DIR": str(tmp_path_factory.mktemp("tls-trainer")),
        "CNEI_TRAINER_TLS_CERT_FILE": pki["cert"], "CNEI_TRAINER_TLS_KEY_FILE": pki["key"]}, port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        infra.stop(proc)


def test_cnei_train_trusting_the_ca_is_served_and_others_refused(tls_trainer, pki):
    clean = {"CNEI_TRAINER_TLS_CA": None, "CNEI_TLS_CA": None}
    listed = run_cnei("train", "list", "--trainer", tls_trainer, "--tls-ca", pki["ca"], env=clean, timeout=60)
    assert listed.returncode == 0, listed.stderr
    by_env = run_cnei("train", "list", "--trainer", tls_trainer, env={**clean, "CNEI_TRAINER_TLS_CA": pki["ca"]},
                      timeout=60)
    assert by_env.returncode == 0, by_env.stderr
    for env in (clean, {**clean, "CNEI_TLS_CA": pki["ca"]}):  # plaintext; a coordinator's CA variable
        refused = run_cnei("train", "list", "--trainer", tls_trainer, env=env, timeout=60)
        assert refused.returncode != 0 and "UNAVAILABLE" in refused.stderr


def test_a_tls_setting_without_its_pair_stops_the_trainer_naming_it():
    out = subprocess.run([sys.executable, "-m", "services.trainer"],
                         env={**os.environ, "CNEI_TRAINER_TLS_KEY_FILE": "k.pem"}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "CNEI_TRAINER_TLS_CERT_FILE" in out.stderr, out.stderr[-500:]
