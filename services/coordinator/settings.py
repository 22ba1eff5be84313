"""Coordinator settings (env prefix CNEI_COORDINATOR_)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import (EventStreamSettings, NodeTlsSettings, RegistryClientSettings,
                                      event_loop_field, field, grpc_reflection_field)

PREFIX = "CNEI_COORDINATOR_"


@dataclass(frozen=True)
class CoordinatorSettings(RegistryClientSettings, NodeTlsSettings, EventStreamSettings):
    event_loop: str = event_loop_field()
    grpc_reflection: bool = grpc_reflection_field()
    host: str = field("127.0.0.1", "address every listener binds to")
    grpc_port: int = field(8001, "OIP gRPC port (Triton's default)")
    http_port: int = field(8000, "OIP REST v2 port")
    shared_memory: bool = field(True, "serve Triton's system shared memory extension (clients on this host "
                                      "name /dev/shm objects the server then reads and writes)")
    metrics_port: int = field(8002, "Prometheus /metrics port (0 disables)")
    workers: int = field(
        1, "coordinator processes sharing the gRPC port (SO_REUSEPORT), each with its own event loop; "
           "0: one per CPU. Worker 0 also serves REST and the status page; /metrics adds them all up")
    worker_index: int = field(-1, "set by the supervisor for each worker process (-1: not a worker)")
    supervisor_pid: int = field(0, "set by the supervisor: a worker stops when that process is gone")
    shared_dir: str = field("", "set by the supervisor: where workers share metrics and statistics")
    front_door: str = field(
        "auto", "compiled gRPC front door (services/coordinator/frontdoor) on grpc_port, batching routable "
                "ModelInfer requests straight to the nodes: auto (when built), on (required), off")
    front_door_binary: str = field("", "path of cnei-frontdoor (empty: the one `make frontdoor` builds)")
    internal_grpc_port: int = field(0, "gRPC port of the coordinator behind the front door, on 127.0.0.1 "
                                       "(0: any free port)")
    tls_cert_file: str = field("", "PEM certificate (chain) of the public gRPC and REST ports: TLS, as Triton's "
                                   "--grpc-use-ssl (empty: plaintext)")
    tls_key_file: str = field("", "PEM private key of that certificate")
    tls_client_ca_file: str = field("", "PEM CA whose client certificates the public ports require (mutual TLS; "
                                        "empty: none asked)")
    restricted_apis: str = field(
        "", "Triton's restricted APIs: '<category>[,...]:<header>=<value>', several joined with ';' (e.g. "
            "'model-repository,trace,logging:admin-key=s3cret'); such calls without the header are "
            "PERMISSION_DENIED (REST 403). Categories: health, metadata, inference, shared-memory, "
            "model-config, model-repository, statistics, trace, logging")
    response_cache_bytes: int = field(
        64 << 20, "memory for the response cache of deployments with response_cache: true, per coordinator "
                  "process (least recently used answers go first; 0: no cache)")
    route_ttl_ms: int = field(100, "how long the front door reuses a placement before asking again")
    trace_level: str = field("TIMESTAMPS", "while spans are exported, inference requests that come without trace "
                                           "context start traces (TIMESTAMPS) or not (OFF); Triton's trace "
                                           "setting, mesh-wide, changed at run time with TraceSetting")
    trace_rate: int = field(
        1, "one such request in N of each model starts a trace (with the front door: takes the traced full "
           "path; 1: every request does, so the door routes none)")
    trace_count: int = field(-1, "traces left to start (-1: no limit)")
    door_report_ms: int = field(100, "how often the front door reports what it served")
    door_spread_nodes: int = field(
        4, "under the edgeai policy, a front-door route names up to this many nodes (the best and its "
           "peers in the same tier and region scoring within door_spread_margin of it); the door "
           "sends each request to the least busy of them")
    door_spread_margin: float = field(0.1, "how far below the best node's score a node may be to share a route")
    registry_target: str = field("127.0.0.1:50051", "registry gRPC address")
    node_headers: str = field(
        "", "headers sent to every edge runtime called (gRPC, NodeControl and the fast lane's hello), "
            "'KEY=VALUE' joined with ';' (for runtimes whose APIs are restricted: CNEI_RUNTIME_RESTRICTED_APIS)")
    redis_url: str = field("redis://127.0.0.1:6379/0", "Redis holding node records")
    nats_url: str = field("nats://127.0.0.1:4222", "NATS for events")
    node_refresh_s: float = field(0.1, "how often the live-node view is re-read from Redis")
    forward_timeout_s: float = field(30.0, "deadline of a forwarded ModelInfer when the client sets none")
    resolve_ttl_s: float = field(2.0, "how long a registry resolution is reused before it is read again in the "
                                      "background (served meanwhile; kept while the registry is unreachable)")
    registry_timeout_s: float = field(
        2.0, "how long a registry read may take: past it (or when the registry is unreachable) the last known "
             "variants and deployments are served, and only a model never read fails UNAVAILABLE")
    max_attempts: int = field(4, "nodes tried for one request when a node fails (unavailable, attempt "
                                  "timeout, INTERNAL)")
    fast_lane: bool = field(True, "talk to runtimes over the internal TCP data plane when offered")
    outbox_path: str = field("", "file buffering events while NATS is away (empty: none)")
    breaker_failures: int = field(3, "consecutive failures that open a breaker: attempt timeouts and INTERNAL "
                                      "answers of one model a node's breaker for the model alone")
    breaker_open_s: float = field(2.0, "how long an open breaker blocks a node before one probe")
