"""What a `cnei` command sends to the server it calls: its headers (restricted APIs) and TLS
files, from its flags or the environment."""
from __future__ import annotations

import argparse

import grpc

from services.common import grpc_util, restricted, tls
from services.common.errors import InvalidArgument
from services.common.registry_client import RegistryClient


def key_values(pairs: list[str], flag: str) -> dict[str, str]:
    """`--flag KEY=VALUE` flags -> a dict; one without `=` or with an empty key is refused by name."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise InvalidArgument(f"{flag} needs KEY=VALUE, not '{pair}'")
        out[key.strip()] = value
    return out


def headers(args: argparse.Namespace) -> list[tuple[str, str]]:
    """--header KEY=VALUE flags, else $CNEI_HEADERS (`k=v;k2=v2`): for restricted APIs."""
    return restricted.client_headers(getattr(args, "header", []))


def credentials(args: argparse.Namespace, env: str = tls.COORDINATOR_ENV) -> grpc.ChannelCredentials | None:
    """TLS to the server the command calls: --tls-ca (and, for mutual TLS, --tls-cert and
    --tls-key), else $<env>_CA / _CERT / _KEY ($CNEI_TLS_* for a coordinator, $CNEI_REGISTRY_TLS_*
    for a registry); None: plaintext."""
    ca, cert, key = tls.client_files(getattr(args, "tls_ca", ""), getattr(args, "tls_cert", ""),
                                     getattr(args, "tls_key", ""), env=env)
    return tls.channel_credentials(ca, cert, key) if ca else None


def trainer(args: argparse.Namespace) -> grpc.aio.Channel:
    """A channel to the trainer the command names (--trainer), with its headers and TLS."""
    return grpc_util.channel(args.trainer, headers(args), credentials(args, tls.TRAINER_ENV))


def registry(args: argparse.Namespace) -> RegistryClient:
    """The registry the command names (--registry), with its headers and TLS."""
    return RegistryClient(args.registry, headers=headers(args), credentials=credentials(args, tls.REGISTRY_ENV))
