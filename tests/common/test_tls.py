"""Client TLS settings: pairs and files checked, and certificates checked as gRPC checks them."""
from __future__ import annotations

import ssl
from types import SimpleNamespace

import pytest

from services.common import tls
from tests.pki import make_pki


def test_client_tls_settings_name_what_is_missing(tmp_path):
    pki = make_pki(tmp_path)
    assert tls.client_tls("CNEI_X_", "NODE", "") is None
    assert tls.client_tls("CNEI_X_", "NODE", pki["ca"], pki["client_cert"], pki["client_key"]) == tls.ClientTls(
        pki["ca"], pki["client_cert"], pki["client_key"])
    for args, message in (((("", pki["client_cert"], pki["client_key"])), "CNEI_X_NODE_TLS_CA_FILE is needed"),
                          (((pki["ca"], pki["client_cert"], "")), "CNEI_X_NODE_TLS_CERT_FILE and CNEI_X_NODE_TLS_KEY"),
                          ((("/nope.pem", "", "")), "CNEI_X_NODE_TLS_CA_FILE: no such file '/nope.pem'")):
        with pytest.raises(ValueError, match=message):
            tls.client_tls("CNEI_X_", "NODE", *args)


def test_ssl_contexts_check_certificates_as_grpc_does(tmp_path):
    """Python 3.13 turns on strict X.509 checks by default, which gRPC and the front door do not
    make: the fast lane's contexts leave them off, so both planes accept the same certificates."""
    pki = make_pki(tmp_path)
    strict = getattr(ssl, "VERIFY_X509_STRICT", 0)
    for context in (tls.client_ssl_context(pki["ca"]),
                    tls.server_ssl_context(tls.ServerTls(pki["cert"], pki["key"], pki["ca"]))):
        assert not context.verify_flags & strict
        assert context.verify_mode is ssl.CERT_REQUIRED


def _settings(pki: dict):
    """Settings whose CAs are a key, and whose server certificate has another's key."""
    return SimpleNamespace(registry_tls_ca_file=pki["client_key"], registry_tls_cert_file="", registry_tls_key_file="",
                           node_tls_ca_file=pki["client_key"], node_tls_cert_file="", node_tls_key_file="",
                           node_tls_server_name="", tls_cert_file=pki["cert"], tls_key_file=pki["client_key"],
                           tls_client_ca_file="")


@pytest.mark.parametrize("kind", ["REGISTRY", "NODE"])
def test_client_pem_files_that_do_not_load_stop_a_service_naming_its_variables(tmp_path, kind):
    with pytest.raises(SystemExit, match=f"x: CNEI_X_{kind}_TLS_CA_FILE / _CERT_FILE / _KEY_FILE do not load"):
        tls.check_client("x", "CNEI_X_", kind, _settings(make_pki(tmp_path)))


def test_server_pem_files_that_do_not_load_stop_a_service_naming_its_variables(tmp_path):
    with pytest.raises(SystemExit, match="x: CNEI_X_TLS_CERT_FILE / _KEY_FILE / _CLIENT_CA_FILE do not load"):
        tls.check_server("x", "CNEI_X_", _settings(make_pki(tmp_path)))  # a certificate with another's key


def test_renewed_files_are_loaded_and_files_that_do_not_load_leave_the_last_good_ones(tmp_path, caplog):
    import os
    import shutil

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copyfile(old["cert"], cert)
    shutil.copyfile(old["key"], key)

    def build() -> bytes:
        tls.check_key_pair(key.read_bytes(), cert.read_bytes())
        return cert.read_bytes()
    files = tls.Reloaded("test", [str(cert), str(key)], build, every_s=0.0)
    assert files.get() == cert.read_bytes() and files.generation == 0

    shutil.copyfile(new["cert"], cert)  # half renewed: the new certificate, the old key
    assert files.get() == open(old["cert"], "rb").read() and files.generation == 0
    assert files.get() == open(old["cert"], "rb").read()
    assert [r.message for r in caplog.records].count(
        "test: the files changed but do not load (the key is not the certificate's); the previous ones stay in use") == 1

    shutil.copyfile(new["key"], tmp_path / "key.tmp")
    os.replace(tmp_path / "key.tmp", key)  # now whole
    assert files.get() == open(new["cert"], "rb").read() and files.generation == 1
    assert files.get() == open(new["cert"], "rb").read() and files.generation == 1  # unchanged since


def test_a_key_pair_is_checked_before_it_is_handed_to_grpc(tmp_path):
    pki = make_pki(tmp_path)
    read = {name: open(path, "rb").read() for name, path in pki.items()}
    tls.check_key_pair(read["key"], read["cert"], read["ca"])
    with pytest.raises(ValueError, match="the key is not the certificate's"):
        tls.check_key_pair(read["client_key"], read["cert"])
    with pytest.raises(ValueError, match="PEM does not load"):
        tls.check_key_pair(read["key"], read["cert"][:40])
    with pytest.raises(ValueError, match="PEM does not load"):
        tls.check_key_pair(read["key"], read["cert"], b"not a CA")


def test_client_credentials_are_refused_when_their_pem_does_not_load_or_the_key_is_another_s(tmp_path):
    """One reader for a command's credentials and a service's renewed ones: what gRPC would only
    fail at each handshake is a ValueError when the files are read."""
    pki = make_pki(tmp_path)
    tls.channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
    with pytest.raises(ValueError, match="the key is not the certificate's"):
        tls.channel_credentials(pki["ca"], pki["client_cert"], pki["key"])
    with pytest.raises(ValueError):
        tls.channel_credentials(pki["client_key"])  # a key where the CA belongs


@pytest.mark.parametrize(("server_name", "options"),
                         [("cnei.example", [("grpc.ssl_target_name_override", "cnei.example")]), ("", [])],
                         ids=["a-name-checked-instead-of-the-host", "none-the-host-checked"])
def test_server_name_options_tell_grpc_which_name_the_certificate_must_hold(server_name, options):
    assert tls.server_name_options(server_name) == options
