"""Registry settings (env prefix CNEI_REGISTRY_)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import EventStreamSettings, event_loop_field, field, grpc_reflection_field

PREFIX = "CNEI_REGISTRY_"


@dataclass(frozen=True)
class RegistrySettings(EventStreamSettings):
    event_loop: str = event_loop_field()
    grpc_reflection: bool = grpc_reflection_field()
    host: str = field("127.0.0.1", "address the gRPC API binds to")
    port: int = field(50051, "gRPC port of the registry API")
    metrics_port: int = field(9101, "Prometheus /metrics port (0 disables)")
    data_dir: str = field(".cnei/registry", "SQLite catalogue and content-addressed artifacts")
    nats_url: str = field("nats://127.0.0.1:4222", "NATS server for model events")
    max_artifact_bytes: int = field(1 << 30, "largest artifact accepted by PushModel")
    concurrent_checks: int = field(
        1, "pushes' ONNX checks run at once, each holding up to ~2.25 × its artifact in memory (size the registry's "
           "memory for this many × MAX_ARTIFACT_BYTES); further pushes wait their turn, not refused; at least 1")
    tombstone_retention_days: float = field(
        90.0, "days a deleted variant's tombstone is kept (ListDeleted; dropped at once when the variant is pushed "
              "again): a runtime that reconnects later than this after a deletion never hears of it and may keep "
              "serving the deleted variant from its disk cache while the registry is away; above 0")
    tls_cert_file: str = field("", "PEM certificate (chain) of the gRPC API: TLS (clients then need "
                                       "CNEI_<SERVICE>_REGISTRY_TLS_CA_FILE); empty: plaintext")
    tls_key_file: str = field("", "PEM private key of that certificate")
    tls_client_ca_file: str = field("", "PEM CA whose client certificates the API requires (mutual TLS)")
    restricted_apis: str = field(
        "", "restricted APIs of the registry: '<category>[,...]:<header>=<value>', several joined with ';'; "
            "categories: metadata (list, resolve, fetch artifacts, read deployments and deleted variants), "
            "model-repository (push and delete models, record measurements, apply deployments). Such calls without "
            "the header are PERMISSION_DENIED; every service then needs CNEI_<SERVICE>_REGISTRY_HEADERS")


def check(prefix: str, settings: RegistrySettings) -> None:
    """Stop (SystemExit naming the variable) before starting on a retention that keeps no tombstone,
    or on fewer than one concurrent check (no push would ever be checked)."""
    if settings.concurrent_checks < 1:
        raise SystemExit(f"{prefix}CONCURRENT_CHECKS ({settings.concurrent_checks}) must be 1 or more: no push "
                         "would ever be checked")
    if not settings.tombstone_retention_days > 0:
        raise SystemExit(f"{prefix}TOMBSTONE_RETENTION_DAYS ({settings.tombstone_retention_days}) must be above 0: "
                         "runtimes away during a deletion would never hear of it")
