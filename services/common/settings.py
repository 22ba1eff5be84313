"""Typed settings objects read once from the environment, one env prefix per service."""
from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(raw: str, kind: Any, name: str) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"setting {name}: expected a boolean, got {raw!r}")
    if kind in (int, float, str):
        try:
            return kind(raw)
        except ValueError as exc:
            raise ValueError(f"setting {name}: expected {kind.__name__}, got {raw!r}") from exc
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    raise TypeError(f"setting {name}: unsupported type {kind!r}")


def field(default: Any, doc: str) -> Any:
    """A settings field with a default and a one-line description (shown by `cnei config`)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def event_loop_field() -> Any:
    """Every service's `event_loop` setting (read by `lifecycle.run_service`)."""
    return field("auto", "asyncio event loop: auto (uvloop when installed, else asyncio's) | uvloop | asyncio; "
                         "uvloop costs less CPU per socket event")


_REGISTRY_TLS_DOCS = {
    "ca": "PEM CA of a registry serving TLS (CNEI_REGISTRY_TLS_CERT_FILE); empty: plaintext",
    "cert": "PEM client certificate for a registry requiring mutual TLS (CNEI_REGISTRY_TLS_CLIENT_CA_FILE)",
    "key": "PEM key of that client certificate",
}


_NODE_TLS_DOCS = {
    "ca": "PEM CA of runtimes serving TLS (CNEI_RUNTIME_TLS_CERT_FILE) on their gRPC and fast-lane ports; "
          "empty: plaintext",
    "cert": "PEM client certificate for runtimes requiring mutual TLS (CNEI_RUNTIME_TLS_CLIENT_CA_FILE)",
    "key": "PEM key of that client certificate",
    "server_name": "the name the runtimes' certificates hold, checked instead of the address each is dialled at "
                   "(one certificate for every node, e.g. on Kubernetes where they advertise pod IPs; empty: "
                   "that address)",
}


def node_tls_field(kind: str) -> Any:
    """A runtime client's TLS setting: `node_tls_ca_file` ("ca"), `node_tls_cert_file` ("cert"),
    `node_tls_key_file` ("key"), `node_tls_server_name` ("server_name")."""
    return field("", _NODE_TLS_DOCS[kind])


def registry_tls_field(kind: str) -> Any:
    """A registry client's TLS setting: `registry_tls_ca_file` ("ca"), `registry_tls_cert_file`
    ("cert"), `registry_tls_key_file` ("key")."""
    return field("", _REGISTRY_TLS_DOCS[kind])


def load(cls: type[T], prefix: str, env: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build a settings dataclass from `{prefix}{FIELD}` variables; overrides win over env."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{prefix}{f.name.upper()}"
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif key in env:
            values[f.name] = _convert(env[key], hints[f.name], key)
    return cls(**values)


def describe(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """(variable, default, doc) rows documenting a settings class."""
    return [
        (f"{prefix}{f.name.upper()}", repr(f.default), f.metadata.get("doc", ""))
        for f in dataclasses.fields(cls)
    ]
