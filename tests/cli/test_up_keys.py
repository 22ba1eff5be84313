"""`cnei up` holds the keys of what it configures: the registry's for every client of it, the
runtimes' for the coordinator and the trainer it starts; and the CA of a registry on TLS."""
from __future__ import annotations

from services.cli.up_keys import NODE_CLIENTS, REGISTRY_CLIENTS, node_headers, registry_ca, registry_headers


def test_the_runtimes_keys_go_to_the_services_that_call_runtimes(monkeypatch):
    monkeypatch.setenv("CNEI_RUNTIME_RESTRICTED_APIS", "inference:node-key=n1;node-control,model-repository:ops=o2")
    monkeypatch.setenv("CNEI_REGISTRY_RESTRICTED_APIS", "model-repository:admin-key=a1")
    assert node_headers() == "node-key=n1;ops=o2"
    assert registry_headers() == "admin-key=a1"
    assert set(NODE_CLIENTS) == {"services.coordinator", "services.trainer"}
    assert set(NODE_CLIENTS) <= set(REGISTRY_CLIENTS)


def test_without_restrictions_no_keys_are_handed_out(monkeypatch):
    monkeypatch.delenv("CNEI_RUNTIME_RESTRICTED_APIS", raising=False)
    monkeypatch.delenv("CNEI_REGISTRY_RESTRICTED_APIS", raising=False)
    assert node_headers() == registry_headers() == ""


def test_a_registry_on_tls_is_trusted_by_its_own_certificate_unless_a_ca_is_named(monkeypatch):
    monkeypatch.delenv("CNEI_REGISTRY_TLS_CERT_FILE", raising=False)
    monkeypatch.setenv("CNEI_REGISTRY_TLS_CA", "/pki/ca.pem")
    assert registry_ca() == ""  # plaintext registry: no CA handed out
    monkeypatch.setenv("CNEI_REGISTRY_TLS_CERT_FILE", "/pki/registry.pem")
    assert registry_ca() == "/pki/ca.pem"
    monkeypatch.delenv("CNEI_REGISTRY_TLS_CA")
    assert registry_ca() == "/pki/registry.pem"  # self-signed


def test_each_service_is_handed_what_it_calls_with_and_its_own_variables_win(monkeypatch):
    from services.cli.up_keys import client_env

    monkeypatch.setenv("CNEI_REGISTRY_RESTRICTED_APIS", "model-repository:admin-key=a1")
    monkeypatch.setenv("CNEI_RUNTIME_RESTRICTED_APIS", "inference:node-key=n1")
    monkeypatch.setenv("CNEI_REGISTRY_TLS_CERT_FILE", "/pki/registry.pem")
    monkeypatch.setenv("CNEI_REGISTRY_TLS_CERT", "/pki/client.pem")
    monkeypatch.setenv("CNEI_REGISTRY_TLS_KEY", "/pki/client.key")
    monkeypatch.setenv("CNEI_TRAINER_NODE_HEADERS", "node-key=mine")
    assert client_env("services.coordinator") == {
        "CNEI_COORDINATOR_REGISTRY_HEADERS": "admin-key=a1", "CNEI_COORDINATOR_REGISTRY_TLS_CA_FILE": "/pki/registry.pem",
        "CNEI_COORDINATOR_REGISTRY_TLS_CERT_FILE": "/pki/client.pem",
        "CNEI_COORDINATOR_REGISTRY_TLS_KEY_FILE": "/pki/client.key", "CNEI_COORDINATOR_NODE_HEADERS": "node-key=n1"}
    assert "CNEI_TRAINER_NODE_HEADERS" not in client_env("services.trainer")  # set by the user: theirs
    assert set(client_env("services.edge_runtime")) == {
        "CNEI_RUNTIME_REGISTRY_HEADERS", "CNEI_RUNTIME_REGISTRY_TLS_CA_FILE", "CNEI_RUNTIME_REGISTRY_TLS_CERT_FILE",
        "CNEI_RUNTIME_REGISTRY_TLS_KEY_FILE"}
    monkeypatch.delenv("CNEI_REGISTRY_TLS_CERT_FILE")  # a plaintext registry: no TLS files handed out
    assert not any("TLS" in name for name in client_env("services.coordinator"))


def test_runtimes_on_tls_are_trusted_by_the_services_that_call_them(monkeypatch):
    from services.cli.up_keys import client_env, node_ca

    for name in ("CNEI_RUNTIME_TLS_CERT_FILE", "CNEI_NODE_TLS_CA", "CNEI_NODE_TLS_CERT", "CNEI_NODE_TLS_KEY",
                 "CNEI_REGISTRY_TLS_CERT_FILE", "CNEI_COORDINATOR_NODE_TLS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CNEI_NODE_TLS_CA", "/pki/ca.pem")
    assert node_ca() == ""  # plaintext runtimes: no CA handed out
    assert not any("TLS" in name for name in client_env("services.trainer"))
    monkeypatch.setenv("CNEI_RUNTIME_TLS_CERT_FILE", "/pki/runtime.pem")
    monkeypatch.setenv("CNEI_NODE_TLS_CERT", "/pki/client.pem")
    monkeypatch.setenv("CNEI_NODE_TLS_KEY", "/pki/client.key")
    assert node_ca() == "/pki/ca.pem"
    for module, prefix in (("services.coordinator", "CNEI_COORDINATOR_"), ("services.trainer", "CNEI_TRAINER_")):
        handed = client_env(module)
        assert (handed[f"{prefix}NODE_TLS_CA_FILE"], handed[f"{prefix}NODE_TLS_CERT_FILE"],
                handed[f"{prefix}NODE_TLS_KEY_FILE"]) == ("/pki/ca.pem", "/pki/client.pem", "/pki/client.key")
    assert not any("NODE_TLS" in name for name in client_env("services.edge_runtime"))
    monkeypatch.delenv("CNEI_NODE_TLS_CA")
    assert node_ca() == "/pki/runtime.pem"  # self-signed
    monkeypatch.setenv("CNEI_COORDINATOR_NODE_TLS_CA_FILE", "/mine.pem")  # the service's own wins
    assert "CNEI_COORDINATOR_NODE_TLS_CA_FILE" not in client_env("services.coordinator")


def test_cnei_up_refuses_to_start_servers_requiring_client_certificates_it_has_none_to_hand(monkeypatch, tmp_path):
    import pytest

    from services.cli.up import Mesh, MeshSettings

    for name in ("CNEI_RUNTIME_TLS_CERT_FILE", "CNEI_RUNTIME_TLS_CLIENT_CA_FILE", "CNEI_NODE_TLS_CERT",
                 "CNEI_NODE_TLS_KEY", "CNEI_NODE_TLS_CA", "CNEI_REGISTRY_TLS_CERT_FILE",
                 "CNEI_REGISTRY_TLS_CLIENT_CA_FILE", "CNEI_REGISTRY_TLS_CERT", "CNEI_REGISTRY_TLS_KEY",
                 "CNEI_COORDINATOR_NODE_TLS_CERT_FILE", "CNEI_TRAINER_NODE_TLS_CERT_FILE",
                 "CNEI_COORDINATOR_REGISTRY_TLS_CERT_FILE", "CNEI_RUNTIME_REGISTRY_TLS_CERT_FILE",
                 "CNEI_TRAINER_REGISTRY_TLS_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    settings = MeshSettings(data_dir=str(tmp_path))
    Mesh(settings).check_client_certificates()  # plaintext: nothing to hand
    monkeypatch.setenv("CNEI_RUNTIME_TLS_CLIENT_CA_FILE", "/pki/ca.pem")
    Mesh(settings).check_client_certificates()  # without their own certificate the runtimes stop themselves, saying so
    monkeypatch.setenv("CNEI_RUNTIME_TLS_CERT_FILE", "/pki/runtime.pem")
    monkeypatch.setenv("CNEI_RUNTIME_TLS_CLIENT_CA_FILE", "/pki/ca.pem")
    with pytest.raises(ValueError, match=r"the runtimes require client certificates \(/pki/ca.pem\): set "
                                         r"\$CNEI_NODE_TLS_CERT/_KEY \(or CNEI_COORDINATOR_NODE_TLS_CERT_FILE, "
                                         r"CNEI_TRAINER_NODE_TLS_CERT_FILE\)"):
        Mesh(settings).check_client_certificates()
    monkeypatch.setenv("CNEI_NODE_TLS_CERT", "/pki/client.pem")
    monkeypatch.setenv("CNEI_NODE_TLS_KEY", "/pki/client.key")
    Mesh(settings).check_client_certificates()
    monkeypatch.setenv("CNEI_REGISTRY_TLS_CERT_FILE", "/pki/registry.pem")
    monkeypatch.setenv("CNEI_REGISTRY_TLS_CLIENT_CA_FILE", "/pki/ca.pem")
    with pytest.raises(ValueError, match="the registry requires client certificates"):
        Mesh(settings).check_client_certificates()
