"""Certificates for TLS tests: a test CA, a server certificate for 127.0.0.1, a client
certificate, and a CA nobody trusts (cryptography, generated per test module)."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, ca: bool, sans: list | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None) -> str:
    data = cert.public_bytes(serialization.Encoding.PEM) if cert is not None else key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


def make_pki(d: Path, names: tuple[str, ...] = ("runtime.test",)) -> dict[str, str]:
    """In folder `d`: a CA, a server certificate for 127.0.0.1/localhost, one naming only `names`
    (`runtime.test`: for clients that check a server name instead of the address they dial), a
    client certificate, and another CA: {name: PEM file}."""
    ca_key, other_key, server_key, client_key, named_key = _key(), _key(), _key(), _key(), _key()
    ca = _cert("cnei test ca", ca_key, "cnei test ca", ca_key, True)
    other = _cert("another ca", other_key, "another ca", other_key, True)
    server = _cert("127.0.0.1", server_key, "cnei test ca", ca_key, False,
                   [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client = _cert("a client", client_key, "cnei test ca", ca_key, False)
    named = _cert(names[0], named_key, "cnei test ca", ca_key, False, [x509.DNSName(n) for n in names])
    return {"ca": _write(d / "ca.pem", ca), "other_ca": _write(d / "other.pem", other),
            "cert": _write(d / "server.pem", server), "key": _write(d / "server.key", key=server_key),
            "client_cert": _write(d / "client.pem", client), "client_key": _write(d / "client.key", key=client_key),
            "named_cert": _write(d / "named.pem", named), "named_key": _write(d / "named.key", key=named_key)}
