"""Typed settings of the command-line clients (`cnei`, the healthcheck), read from the environment
as a service's are and listed by `cnei config` from these same classes."""
from __future__ import annotations

import dataclasses

from services.common.settings import field, load

HEADERS_PREFIX = "CNEI_"  # $CNEI_HEADERS
HEALTHCHECK_PREFIX = "CNEI_HEALTHCHECK_"


@dataclasses.dataclass(frozen=True)
class ClientTlsSettings:
    """A command-line client's TLS files for one kind of server: $<prefix>CA, _CERT, _KEY (the
    prefixes are services.common.tls's CLIENT_TLS_PREFIXES)."""

    ca: str = field("", "PEM CA of the server when it serves TLS; empty: plaintext (a command's --tls-ca wins)")
    cert: str = field("", "PEM client certificate for a server requiring mutual TLS (a command's --tls-cert wins)")
    key: str = field("", "PEM key of that client certificate (a command's --tls-key wins)")


@dataclasses.dataclass(frozen=True)
class ClientHeaderSettings:
    """The headers a `cnei` command sends when given no --header."""

    headers: str = field("", "headers every cnei command sends, 'KEY=VALUE' joined with ';' (servers whose "
                             "APIs are restricted); --header wins")


@dataclasses.dataclass(frozen=True)
class HealthcheckSettings:
    """What `python -m services.cli.healthcheck` (a container's health probe) reads when not told."""

    tls_ca: str = field("", "PEM CA of a server on TLS; empty: plaintext (--tls-ca wins)")
    tls_cert: str = field("", "PEM client certificate for a server requiring mutual TLS (--tls-cert wins)")
    tls_key: str = field("", "PEM key of that client certificate (--tls-key wins)")
    tls_server_name: str = field("", "the name the server's certificate holds, checked instead of the host "
                                     "dialled (--tls-server-name wins)")


def client_tls_files(prefix: str) -> ClientTlsSettings:
    """The TLS files in this process's environment under `prefix` (e.g. 'CNEI_REGISTRY_TLS_')."""
    return load(ClientTlsSettings, prefix)


def env_headers() -> str:
    """$CNEI_HEADERS ('' when unset)."""
    return load(ClientHeaderSettings, HEADERS_PREFIX).headers
