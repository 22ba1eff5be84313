"""What `cnei up` hands the services it starts and uses in its own calls: the keys of restricted
APIs (registry, runtimes) and the TLS files (CA, client certificate) of the servers they call."""
from __future__ import annotations

import os

from services.common import tls
from services.coordinator.settings import PREFIX as COORDINATOR_PREFIX
from services.edge_runtime.settings import PREFIX as RUNTIME_PREFIX
from services.trainer.settings import PREFIX as TRAINER_PREFIX

# The services that call the registry: module -> settings prefix (for their REGISTRY_HEADERS)
REGISTRY_CLIENTS = {"services.coordinator": COORDINATOR_PREFIX, "services.edge_runtime": RUNTIME_PREFIX,
                    "services.trainer": TRAINER_PREFIX}
# The services that call runtimes: module -> settings prefix (for their NODE_HEADERS)
NODE_CLIENTS = {"services.coordinator": COORDINATOR_PREFIX, "services.trainer": TRAINER_PREFIX}
# The servers `cnei up` may put on TLS, and what their clients are handed: (the clients' settings
# infix, the servers' own settings prefix, the variables naming the clients' CA/certificate/key in
# this process's environment, the clients, who refuses a certificate-less client).
TLS_SERVERS = (("REGISTRY", "CNEI_REGISTRY_", tls.REGISTRY_ENV, REGISTRY_CLIENTS, "registry requires"),
               ("NODE", RUNTIME_PREFIX, tls.NODE_ENV, NODE_CLIENTS, "runtimes require"))


def registry_headers() -> str:
    """The headers (`k=v;...`) the registry this process configures asks for, when
    CNEI_REGISTRY_RESTRICTED_APIS restricts it ('' otherwise): `cnei up` holds the key, so its
    services and its own pushes send it (a service's own CNEI_<SERVICE>_REGISTRY_HEADERS wins)."""
    from services.common.restricted import REGISTRY_API, categories_of, own_headers

    pairs = own_headers(os.environ.get("CNEI_REGISTRY_RESTRICTED_APIS", ""), categories_of(REGISTRY_API))
    return ";".join(f"{k}={v}" for k, v in pairs)


def trusted_ca(server_prefix: str, env: str) -> str:
    """The CA the clients of servers this process configures trust, when those serve TLS
    (`{server_prefix}TLS_CERT_FILE`): ${env}_CA, else the servers' own certificate (self-signed);
    '' when they serve plaintext."""
    own = os.environ.get(f"{server_prefix}TLS_CERT_FILE", "")
    return (tls.client_files(env=env)[0] or own) if own else ""


def registry_ca() -> str:
    """The CA its services trust for the registry this process configures (trusted_ca:
    $CNEI_REGISTRY_TLS_CA, else CNEI_REGISTRY_TLS_CERT_FILE; '' for a plaintext registry)."""
    return trusted_ca("CNEI_REGISTRY_", tls.REGISTRY_ENV)


def registry_credentials():
    """The registry calls of `cnei up` and the compose demo (pushes, health): TLS when the registry
    serves it (registry_ca, else $CNEI_REGISTRY_TLS_CA), with $CNEI_REGISTRY_TLS_CERT/KEY for
    mutual TLS; None: plaintext."""
    ca, cert, key = tls.client_files(default_ca=registry_ca(), env=tls.REGISTRY_ENV)
    return tls.channel_credentials(ca, cert, key) if ca else None


def node_ca() -> str:
    """The CA the coordinator and trainer this process starts trust for its runtimes (trusted_ca:
    $CNEI_NODE_TLS_CA, else CNEI_RUNTIME_TLS_CERT_FILE; '' for plaintext runtimes)."""
    return trusted_ca(RUNTIME_PREFIX, tls.NODE_ENV)


def client_env(module: str) -> dict[str, str]:
    """The settings `cnei up` hands a service it starts (a variable already in its environment
    wins): a restricted registry's key, a TLS registry's CA and $CNEI_REGISTRY_TLS_CERT/KEY as
    client certificate, and its runtimes' keys, CA (node_ca) and $CNEI_NODE_TLS_CERT/KEY."""
    handed = {}
    keys = {"REGISTRY": registry_headers, "NODE": node_headers}
    for kind, server_prefix, env, clients, _ in TLS_SERVERS:
        prefix = clients.get(module)
        if prefix:
            ca = trusted_ca(server_prefix, env)
            ca, cert, key = tls.client_files(default_ca=ca, env=env) if ca else ("",) * 3
            handed |= {f"{prefix}{kind}_HEADERS": keys[kind](), f"{prefix}{kind}_TLS_CA_FILE": ca,
                       f"{prefix}{kind}_TLS_CERT_FILE": cert, f"{prefix}{kind}_TLS_KEY_FILE": key}
    return {name: value for name, value in handed.items() if value and name not in os.environ}


def node_headers() -> str:
    """The headers (`k=v;...`) the runtimes this process starts ask for, when
    CNEI_RUNTIME_RESTRICTED_APIS restricts them ('' otherwise): the coordinator and the trainer it
    starts send them (their own CNEI_<SERVICE>_NODE_HEADERS wins)."""
    from services.common.restricted import RUNTIME_API, categories_of, own_headers

    pairs = own_headers(os.environ.get("CNEI_RUNTIME_RESTRICTED_APIS", ""), categories_of(RUNTIME_API))
    return ";".join(f"{k}={v}" for k, v in pairs)


def coordinator_credentials():
    """TLS to the coordinator this process configured, when its public ports use it: trusting
    $CNEI_TLS_CA, else its own certificate (self-signed), with $CNEI_TLS_CERT/KEY for mutual TLS;
    None: plaintext."""
    own = os.environ.get("CNEI_COORDINATOR_TLS_CERT_FILE", "")
    return tls.channel_credentials(*tls.client_files(default_ca=own)) if own else None


def check_client_certificates(handed: dict[str, dict[str, str]]) -> None:
    """A registry or runtimes that require client certificates (their TLS_CLIENT_CA_FILE) have
    one handed to every service that calls them (`handed`: module -> its client_env): ValueError
    naming what to set otherwise (rather than a mesh whose calls are all refused at the handshake)."""
    for kind, server_prefix, env, clients, server in TLS_SERVERS:
        # (a client CA without the server's own certificate stops that server, naming it)
        client_ca = trusted_ca(server_prefix, env) and os.environ.get(f"{server_prefix}TLS_CLIENT_CA_FILE", "")
        missing = sorted(f"{prefix}{kind}_TLS_CERT_FILE" for module, prefix in clients.items()
                         if client_ca and not (handed.get(module, {}).get(f"{prefix}{kind}_TLS_CERT_FILE")
                                               or os.environ.get(f"{prefix}{kind}_TLS_CERT_FILE")))
        if missing:
            raise ValueError(f"the {server} client certificates ({client_ca}): set ${env}_CERT/_KEY "
                             f"(or {', '.join(missing)})")
