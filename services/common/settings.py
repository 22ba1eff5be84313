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


class SettingError(ValueError):
    """A variable whose value does not convert to its field's type (the message names both)."""


def _convert(raw: str, kind: Any, name: str) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise SettingError(f"setting {name}: expected a boolean, got {raw!r}")
    if kind in (int, float, str):
        try:
            return kind(raw)
        except ValueError as exc:
            raise SettingError(f"setting {name}: expected {kind.__name__}, got {raw!r}") from exc
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


def grpc_reflection_field() -> Any:
    """Every gRPC service's `grpc_reflection` setting (passed to lifecycle.GrpcServer)."""
    return field(True, "gRPC server reflection: grpcurl and other clients list and describe this server's services "
                       "and call them without .proto files; it describes the protos only, never data, to every "
                       "client whatever the restricted APIs; false: off")


@dataclasses.dataclass(frozen=True)
class RegistryClientSettings:
    """What every client of the registry sets besides its address (a service's settings class
    derives from it): the keys of a registry whose APIs are restricted, and its TLS trust."""

    registry_headers: str = field(
        "", "headers sent with every registry call, 'KEY=VALUE' joined with ';' (for a registry whose APIs are "
            "restricted: CNEI_REGISTRY_RESTRICTED_APIS)")
    registry_tls_ca_file: str = field("", "PEM CA of a registry serving TLS (CNEI_REGISTRY_TLS_CERT_FILE); "
                                          "empty: plaintext")
    registry_tls_cert_file: str = field("", "PEM client certificate for a registry requiring mutual TLS "
                                            "(CNEI_REGISTRY_TLS_CLIENT_CA_FILE)")
    registry_tls_key_file: str = field("", "PEM key of that client certificate")


@dataclasses.dataclass(frozen=True)
class NodeTlsSettings:
    """What a client of the runtimes (coordinator, trainer) sets to trust runtimes serving TLS (its
    settings class derives from it); services.common.tls.node_tls reads them."""

    node_tls_ca_file: str = field("", "PEM CA of runtimes serving TLS (CNEI_RUNTIME_TLS_CERT_FILE) on their gRPC "
                                      "and fast-lane ports; empty: plaintext")
    node_tls_cert_file: str = field("", "PEM client certificate for runtimes requiring mutual TLS "
                                        "(CNEI_RUNTIME_TLS_CLIENT_CA_FILE)")
    node_tls_key_file: str = field("", "PEM key of that client certificate")
    node_tls_server_name: str = field(
        "", "the name the runtimes' certificates hold, checked instead of the address each is dialled at (one "
            "certificate for every node, e.g. on Kubernetes where they advertise pod IPs; empty: that address)")


@dataclasses.dataclass(frozen=True)
class EventStreamSettings:
    """How a service makes the events stream (JetStream) when none has yet (its settings class
    derives from it); an existing stream keeps its own copies and limits."""

    events_stream_replicas: int = field(1, "copies of the events stream a NATS cluster keeps (up to 5; at most its "
                                           "servers: 3 for the chart's cluster)")
    events_max_age_s: float = field(7 * 24 * 3600.0, "events older than this are dropped from the stream")
    events_max_bytes: int = field(1 << 30, "the stream's size limit in bytes; the oldest events go first")

    def stream_limits(self):
        from services.common.bus import StreamLimits

        return StreamLimits(self.events_stream_replicas, self.events_max_age_s, self.events_max_bytes)


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


def load_at_start(cls: type[T], prefix: str) -> T:
    """`load` for a process starting: a value that does not convert ends it with the one line
    that names the variable and the value (SystemExit), not a traceback."""
    try:
        return load(cls, prefix)
    except SettingError as exc:
        raise SystemExit(str(exc)) from None


def describe(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """(variable, default, doc) rows documenting a settings class."""
    return [
        (f"{prefix}{f.name.upper()}", repr(f.default), f.metadata.get("doc", ""))
        for f in dataclasses.fields(cls)
    ]
