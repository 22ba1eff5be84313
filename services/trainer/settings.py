"""Trainer settings (env prefix CNEI_TRAINER_)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import (EventStreamSettings, NodeTlsSettings, RegistryClientSettings,
                                      event_loop_field, field, grpc_reflection_field)

PREFIX = "CNEI_TRAINER_"


@dataclass(frozen=True)
class TrainerSettings(RegistryClientSettings, NodeTlsSettings, EventStreamSettings):
    event_loop: str = event_loop_field()
    grpc_reflection: bool = grpc_reflection_field()
    host: str = field("127.0.0.1", "address the gRPC API binds to")
    port: int = field(50071, "gRPC port of the Trainer API")
    metrics_port: int = field(9121, "Prometheus /metrics port (0 disables)")
    registry_target: str = field("127.0.0.1:50051", "registry gRPC address (base weights in, new versions out)")
    node_headers: str = field(
        "", "headers sent to every edge runtime called (its federated rounds over NodeControl), "
            "'KEY=VALUE' joined with ';' (for runtimes whose APIs are restricted: CNEI_RUNTIME_RESTRICTED_APIS)")
    tls_cert_file: str = field("", "PEM certificate (chain) of the Trainer API: TLS (`cnei train` then needs "
                                       "--tls-ca or $CNEI_TRAINER_TLS_CA); empty: plaintext")
    tls_key_file: str = field("", "PEM private key of that certificate")
    tls_client_ca_file: str = field("", "PEM CA whose client certificates the API requires (mutual TLS)")
    restricted_apis: str = field(
        "", "restricted APIs of the Trainer API: '<category>[,...]:<header>=<value>', several joined with ';'; "
            "categories: metadata (jobs and their rounds), model-repository (starting a job, which publishes a "
            "version). Such calls without the header are PERMISSION_DENIED")
    redis_url: str = field("redis://127.0.0.1:6379/0", "Redis: live nodes in, job records out")
    nats_url: str = field("nats://127.0.0.1:4222", "NATS for federated events")
    data_dir: str = field(".cnei/trainer", "where trained ONNX variants and the event outbox are written")
    client_tier: str = field("edge", "tier of the nodes that take part in rounds")
    round_timeout_s: float = field(30.0, "default deadline of one round; later clients are dropped")
    max_running_jobs: int = field(4, "jobs this trainer runs at once; more are refused (RESOURCE_EXHAUSTED)")
    round_retries: int = field(2, "extra attempts of a round that got fewer than min_clients updates")
    retry_wait_s: float = field(1.0, "pause before a failed round is attempted again")
    transient_retry_s: float = field(
        300.0, "how long a job keeps trying again, from its last completed round, while Redis or the registry is "
               "away (connection errors, timeouts, UNAVAILABLE, DEADLINE_EXCEEDED) before it is suspended for any "
               "trainer to take over")
    transient_wait_s: float = field(1.0, "first pause before such a try, doubled each time up to 30 s")
    job_ttl_s: float = field(7 * 24 * 3600.0, "how long job records are kept in Redis")
    lease_s: float = field(10.0, "a running job's lease in Redis; a job whose trainer died is taken over after it")
    shutdown_grace_s: float = field(5.0, "how long in-flight RPCs may finish at shutdown")


def check(settings: TrainerSettings) -> None:
    """SystemExit naming the first setting out of range, before the trainer starts."""
    rules = [("round_retries", settings.round_retries >= 0, ">= 0 (extra attempts of a round that fell short)"),
             ("transient_retry_s", settings.transient_retry_s >= 0, ">= 0 (0: suspend at the first trouble)"),
             ("transient_wait_s", settings.transient_wait_s > 0, "> 0")]
    for name, ok, rule in rules:
        if not ok:
            raise SystemExit(f"{PREFIX}{name.upper()} must be {rule}, got {getattr(settings, name)!r}")
