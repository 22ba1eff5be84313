"""TLS for the public ports (Triton's `--grpc-use-ssl`, `--grpc-server-cert`, `--grpc-server-key`,
`--grpc-root-cert` with `--grpc-use-ssl-mutual`): a certificate and key in PEM files, and
optionally the CA whose client certificates are required (mutual TLS). Clients trust a CA file.

Renewed files are taken without a restart (cert-manager, a Kubernetes Secret volume, a file
rewritten in place): servers look at their files at most once a second when a client connects,
clients when they open a connection; files that change but do not load (half written, a key
that is not the certificate's) leave the last good ones in use, logged."""
from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.client_settings import client_tls_files
from services.common.file_reload import RELOAD_CHECK_S, Reloaded


def check_key_pair(key_pem: bytes, cert_pem: bytes, ca_pem: bytes | None = None) -> None:
    """ValueError unless the key is the certificate's (the first of its chain) and the CA bundle,
    when given, holds certificates: PEM read as gRPC will be handed it."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if ca_pem is not None:
            x509.load_pem_x509_certificates(ca_pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"PEM does not load: {exc}") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, raw)
            != certificate.public_key().public_bytes(serialization.Encoding.DER, raw)):
        raise ValueError("the key is not the certificate's")


@dataclass(frozen=True)
class ServerTls:
    """PEM files of a server: its certificate (chain) and key, and the CA of the client
    certificates it requires ("" = clients need none)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    @property
    def files(self) -> list[str]:
        return [f for f in (self.cert_file, self.key_file, self.client_ca_file) if f]


def server_tls(prefix: str, cert_file: str, key_file: str, client_ca_file: str = "") -> ServerTls | None:
    """The server's TLS files from its settings (None: plain), or ValueError naming the variable
    that is missing or unreadable (`prefix`: the settings' environment prefix)."""
    if not (cert_file or key_file or client_ca_file):
        return None
    if not cert_file or not key_file:
        missing = "TLS_CERT_FILE" if not cert_file else "TLS_KEY_FILE"
        raise ValueError(f"{prefix}{missing} is needed with the other TLS settings")
    _check_files(prefix, {"TLS_CERT_FILE": cert_file, "TLS_KEY_FILE": key_file, "TLS_CLIENT_CA_FILE": client_ca_file})
    return ServerTls(cert_file, key_file, client_ca_file)


def _check_files(prefix: str, files: dict[str, str]) -> None:
    """ValueError naming the first setting ({name: path}) whose file is not there ("" = unset)."""
    for name, path in files.items():
        if path and not Path(path).is_file():
            raise ValueError(f"{prefix}{name}: no such file '{path}'")


def check_server(service: str, prefix: str, settings) -> None:
    """A service's own TLS settings (`tls_cert_file`, `tls_key_file`, `tls_client_ca_file`) can
    work, their PEM files loading as a key pair and a CA: SystemExit naming the variables
    otherwise, before the service starts."""
    def load() -> None:
        files = server_tls(prefix, settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        if files is not None:
            server_ssl_context(files)
    check_loads(f"{service}: ", f"{prefix}TLS_CERT_FILE / _KEY_FILE / _CLIENT_CA_FILE", load)


def check_loads(lead: str, variables: str, load: Callable[[], object]) -> None:
    """Run `load` (reads TLS settings and loads their PEM files) before a service starts:
    SystemExit (its message after `lead`) naming the setting that is wrong, or the `variables`
    whose files do not load."""
    try:
        load()
    except ValueError as exc:
        raise SystemExit(f"{lead}{exc}") from None
    except (ssl.SSLError, OSError) as exc:
        raise SystemExit(f"{lead}{variables} do not load: {exc}") from None


def grpc_server_credentials(tls: ServerTls, every_s: float = RELOAD_CHECK_S) -> grpc.ServerCredentials:
    """The server's credentials, renewed when its files change (gRPC asks at each new connection)."""
    def build() -> grpc.ServerCertificateConfiguration:
        key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
        ca = Path(tls.client_ca_file).read_bytes() if tls.mutual else None
        check_key_pair(key, cert, ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    config = Reloaded(f"TLS {tls.cert_file}", tls.files, build, every_s)
    handed = [config.current]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        current = config.get()
        if current is handed[0]:
            return None
        handed[0] = current
        return current
    return grpc.dynamic_ssl_server_credentials(config.current, fetch, require_client_authentication=tls.mutual)


def _server_context(tls: ServerTls) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _as_grpc(context)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.mutual:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_ssl_context(tls: ServerTls, every_s: float = RELOAD_CHECK_S) -> ssl.SSLContext:
    """For a TLS socket server (REST, the fast lane): the same certificate, and client
    certificates when mutual. Each handshake is moved to a context made from the files as they
    are now (renewed ones; a CA dropped from the client CA file is no longer trusted)."""
    contexts = Reloaded(f"TLS {tls.cert_file}", tls.files, lambda: _server_context(tls), every_s)
    first = contexts.current

    def renewed(ssl_object, server_name, context) -> None:
        current = contexts.get()
        if current is not context:
            ssl_object.context = current
    first.sni_callback = renewed
    return first


COORDINATOR_ENV = "CNEI_TLS"  # $CNEI_TLS_CA/_CERT/_KEY: a client's files for a coordinator
REGISTRY_ENV = "CNEI_REGISTRY_TLS"  # $CNEI_REGISTRY_TLS_CA/_CERT/_KEY: for a registry
TRAINER_ENV = "CNEI_TRAINER_TLS"  # $CNEI_TRAINER_TLS_CA/_CERT/_KEY: for a trainer
NODE_ENV = "CNEI_NODE_TLS"  # $CNEI_NODE_TLS_CA/_CERT/_KEY: what `cnei up` hands the clients of its runtimes
# each variable stem, whose server it is (listed by `cnei config`)
CLIENT_TLS_ENVS = ((COORDINATOR_ENV, "a coordinator (cnei infer, status, control verbs)"),
                   (REGISTRY_ENV, "a registry (cnei models, deploy; cnei up's pushes)"),
                   (TRAINER_ENV, "a trainer (cnei train)"),
                   (NODE_ENV, "runtimes: what cnei up hands the coordinator and trainer it starts"))


def client_files(ca_file: str = "", cert_file: str = "", key_file: str = "",
                 default_ca: str = "", env: str = COORDINATOR_ENV) -> tuple[str, str, str]:
    """A command-line client's TLS files (CA, certificate, key): each one given, else
    $<env>_CA / $<env>_CERT / $<env>_KEY (the CA else `default_ca`); an empty CA: plaintext.
    `env`: COORDINATOR_ENV or REGISTRY_ENV (each server its own CA)."""
    from_env = client_tls_files(f"{env}_")
    return ca_file or from_env.ca or default_ca, cert_file or from_env.cert, key_file or from_env.key


def channel_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """A client's: trust `ca_file`; present `cert_file`/`key_file` to a server that asks (mutual).
    ValueError when the PEM does not load or the key is not the certificate's (gRPC would only
    fail the handshakes)."""
    ca = Path(ca_file).read_bytes()
    key = Path(key_file).read_bytes() if key_file else None
    cert = Path(cert_file).read_bytes() if cert_file else None
    if key is not None:
        check_key_pair(key, cert, ca)
    else:
        x509.load_pem_x509_certificates(ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def server_name_options(server_name: str) -> list[tuple[str, str]]:
    """A TLS channel's gRPC options that check `server_name` in the server's certificate instead
    of the host dialled ("": none; the host is checked)."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


@dataclass(frozen=True)
class ClientTls:
    """PEM files of a service's client side for some servers: the CA it trusts, and its own
    certificate and key for servers that require one (mutual TLS; "" = none)."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""  # the name servers' certificates must hold ("": the host dialled)

    @property
    def files(self) -> list[str]:
        return [f for f in (self.ca_file, self.cert_file, self.key_file) if f]

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca_file, self.cert_file, self.key_file)

    def ssl_context(self) -> ssl.SSLContext:
        """For a TLS socket (the fast lane): the server's certificate checked against the CA and
        its host name or IP address."""
        return client_ssl_context(self.ca_file, self.cert_file, self.key_file)

    def renewed_grpc_credentials(self, every_s: float = RELOAD_CHECK_S) -> Reloaded[grpc.ChannelCredentials]:
        """Credentials made again when the files change (channels made with older ones keep
        them: see grpc_util.Channels)."""
        return Reloaded(f"TLS client {self.cert_file or self.ca_file}", self.files, self.grpc_credentials, every_s)

    def renewed_ssl_context(self, every_s: float = RELOAD_CHECK_S) -> Callable[[], ssl.SSLContext]:
        """`ssl_context` as the files are now (looked at most every `every_s`), for each connection."""
        return Reloaded(f"TLS client {self.cert_file or self.ca_file}", self.files, self.ssl_context, every_s).get


def client_tls(prefix: str, kind: str, ca_file: str, cert_file: str = "", key_file: str = "") -> ClientTls | None:
    """A service's client TLS files for the servers its `{kind}_TLS_*` settings name (REGISTRY,
    NODE); None: plaintext. ValueError naming the variable that is missing or unreadable."""
    if not (ca_file or cert_file or key_file):
        return None
    name = f"{prefix}{kind}_TLS_"
    if not ca_file:
        raise ValueError(f"{name}CA_FILE is needed with a client certificate")
    if bool(cert_file) != bool(key_file):
        raise ValueError(f"{name}CERT_FILE and {name}KEY_FILE go together")
    _check_files(prefix, {f"{kind}_TLS_CA_FILE": ca_file, f"{kind}_TLS_CERT_FILE": cert_file,
                          f"{kind}_TLS_KEY_FILE": key_file})
    return ClientTls(ca_file, cert_file, key_file)


def registry_tls(prefix: str, settings) -> ClientTls | None:
    """A service's client TLS for a registry serving TLS, from its `registry_tls_ca_file`,
    `registry_tls_cert_file` and `registry_tls_key_file` settings (None: plaintext)."""
    return client_tls(prefix, "REGISTRY", settings.registry_tls_ca_file, settings.registry_tls_cert_file,
                      settings.registry_tls_key_file)


def node_tls(prefix: str, settings) -> ClientTls | None:
    """A service's client TLS for runtimes whose gRPC and fast-lane ports serve TLS, from its
    `node_tls_ca_file`, `node_tls_cert_file`, `node_tls_key_file` and `node_tls_server_name`
    settings (None: plaintext)."""
    files = client_tls(prefix, "NODE", settings.node_tls_ca_file, settings.node_tls_cert_file,
                       settings.node_tls_key_file)
    if files is None and settings.node_tls_server_name:
        raise ValueError(f"{prefix}NODE_TLS_SERVER_NAME needs {prefix}NODE_TLS_CA_FILE")
    return replace(files, server_name=settings.node_tls_server_name) if files else None


def check_client(service: str, prefix: str, kind: str, settings) -> None:
    """A service's client TLS for the servers of `kind` (REGISTRY: `registry_tls`, NODE:
    `node_tls`) can work, its PEM files loading: SystemExit naming the variables otherwise, before
    the service starts."""
    read = {"REGISTRY": registry_tls, "NODE": node_tls}[kind]

    def load() -> None:
        files = read(prefix, settings)
        if files is not None:
            files.ssl_context()
    check_loads(f"{service}: ", f"{prefix}{kind}_TLS_CA_FILE / _CERT_FILE / _KEY_FILE", load)


def _as_grpc(context: ssl.SSLContext) -> None:
    """Certificates checked as gRPC and OpenSSL check them: Python 3.13 adds strict X.509 checks
    (VERIFY_X509_STRICT: an Authority Key Identifier required, ...) that gRPC and the front door do
    not make, which would fail on the fast lane the certificates the gRPC port accepts."""
    context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)


def client_ssl_context(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    _as_grpc(context)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context
