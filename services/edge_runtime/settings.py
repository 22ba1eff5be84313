"""Edge/cloud runtime settings (env prefix CNEI_RUNTIME_)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import (EventStreamSettings, RegistryClientSettings, event_loop_field, field,
                                      grpc_reflection_field)

PREFIX = "CNEI_RUNTIME_"


@dataclass(frozen=True)
class RuntimeSettings(RegistryClientSettings, EventStreamSettings):
    event_loop: str = event_loop_field()
    grpc_reflection: bool = grpc_reflection_field()
    node_id: str = field("edge-1", "unique node id in the mesh")
    tier: str = field("edge", "edge | cloud")
    region: str = field("site-a", "region / site the node belongs to")
    host: str = field("127.0.0.1", "address the OIP gRPC server binds to")
    advertise_host: str = field("", "host other services dial (default: host)")
    port: int = field(50061, "OIP gRPC port of this node")
    http_port: int = field(0, "OIP REST v2 port of this node (KServe v2 HTTP/JSON and Triton's HTTP API, as the "
                              "coordinator's REST port; its TLS and restricted APIs those of the gRPC port); "
                              "0: none")
    fast_lane: bool = field(True, "serve the coordinator's internal TCP data plane too")
    shared_memory: bool = field(True, "serve Triton's system shared memory extension (clients on this host "
                                      "name /dev/shm objects the server then reads and writes)")
    fast_port: int = field(0, "port of the internal data plane (0: any free port, advertised)")
    tls_cert_file: str = field("", "PEM certificate (chain) of the OIP gRPC port and the fast lane: TLS (coordinators "
                                   "and trainers then need CNEI_<SERVICE>_NODE_TLS_CA_FILE); empty: plaintext")
    tls_key_file: str = field("", "PEM private key of that certificate")
    tls_client_ca_file: str = field("", "PEM CA whose client certificates both ports require (mutual TLS)")
    metrics_port: int = field(9111, "Prometheus /metrics port (0 disables)")
    registry_target: str = field("127.0.0.1:50051", "registry gRPC address")
    redis_url: str = field("redis://127.0.0.1:6379/0", "Redis for node records")
    nats_url: str = field("nats://127.0.0.1:4222", "NATS for events")
    cache_dir: str = field(
        ".cnei/cache/edge-1", "on-disk artifact cache; a variant deleted from the registry leaves it at its event, or "
                              "at the next start or NATS reconnect from the registry's tombstones (kept "
                              "CNEI_REGISTRY_TOMBSTONE_RETENTION_DAYS: a runtime away longer may keep a deleted "
                              "variant)")
    cache_max_bytes: int = field(2 << 30, "byte budget of loaded models (L1); LRU eviction")
    disk_cache_max_bytes: int = field(
        8 << 30, "byte budget of the disk cache (artifacts and their manifests; keep it under the volume's size): the "
                 "least recently used artifacts are deleted to make room for a new one, never those in memory, being "
                 "pulled or measured, of a version requests go to (a deployment's stable version and canary, the "
                 "version an ensemble step or a joint deployment's cloud model runs), or the newest cached version of "
                 "a model in each precision (a pull that still does not fit is RESOURCE_EXHAUSTED); 0: no limit")
    outbox_max_bytes: int = field(
        64 << 20, "byte bound of the event outbox (events kept in the cache folder while NATS is away, outside "
                  "DISK_CACHE_MAX_BYTES; its append-only file up to 1.5 × this, 2.5 × while the sent and dropped front "
                  "is cut off it): an event that would go over it drops the oldest kept first "
                  "(cnei_outbox_dropped_total, logged): the newest are kept, such as the latest metrics snapshot, "
                  "whose counts are cumulative; 0: only the 100000-event bound; below 0: the runtime does not start")
    heartbeat_interval_s: float = field(0.2, "seconds between heartbeats")
    heartbeat_ttl_s: float = field(0.8, "node record expiry in Redis")
    restricted_apis: str = field(
        "", "Triton's restricted APIs on this node's OIP port: '<category>[,...]:<header>=<value>', several "
            "joined with ';' (categories as the coordinator's, plus node-control for the NodeControl service); "
            "the fast lane takes the inference key")
    trace_level: str = field("TIMESTAMPS", "while spans are exported, OIP requests that come without trace context "
                                           "start traces (TIMESTAMPS) or not (OFF); Triton's trace setting")
    trace_rate: int = field(1, "one such request in N of each model starts a trace")
    trace_count: int = field(-1, "traces left to start (-1: no limit)")
    intra_op_threads: int = field(
        0, "ONNX Runtime intra-op threads per session (0: chosen per model when it loads: every core of the "
           "process, up to 8, when that runs a 16-row call ≥1.25× faster than one thread taking ≥0.5 ms, else 1)")
    inference_workers: int = field(2, "threads running ONNX Runtime calls")
    inline_max_us: float = field(
        200.0, "models whose calls average below this many µs run on the event loop, not a thread (0: never)")
    batching: bool = field(
        True, "merge requests of one model variant that wait for it into one ONNX Runtime call (dynamic batching "
              "for every caller: this node's own OIP clients and coordinators; models run on the event loop are "
              "not batched)")
    batch_max_size: int = field(64, "rows per batched call at most (and at most the model's max batch size; 0: that alone)")
    batch_queue_delay_us: int = field(0, "hold a batch this long for more rows (0: what queued while the model "
                                         "was busy runs as soon as it is free)")
    batch_queue_size: int = field(1024, "requests queued per model variant; more are refused (RESOURCE_EXHAUSTED)")
    use_cuda: bool = field(True, "use the CUDA provider when onnxruntime offers it")
    metrics_interval_s: float = field(5.0, "seconds between metrics snapshot events (0: none)")
    node_class: str = field("", "class of hardware for measured latency (default: the tier)")
    measure_on_load: bool = field(True, "measure batch-1 latency and memory when a variant loads")
    measure_siblings: bool = field(
        True, "with MEASURE_ON_LOAD, also measure the other precisions of a loaded version that have no latency "
              "for this node class in the registry (pulled to the disk cache, never into memory: one at a time on "
              "a lowest-priority thread while no request is in flight), so precision policies can choose them")
    cost_per_cpu_second: float = field(0.00002, "price of one CPU second on this node (cloud: higher)")
    cost_per_network_mb: float = field(0.0, "price of one MB moved to or from this node (cloud egress)")
    watts_per_core: float = field(15.0, "power of one busy core, for CPU energy estimates")
    energy_source: str = field(
        "auto", "auto (NVML power x run time for models on CUDA, else CPU) | cpu | nvml (GPU power always)")
    gpu_index: int = field(0, "GPU whose NVML power readings are used")
    emulated_slowdown: float = field(1.0, "benchmarks only: make every ORT run this many times slower")
    emulated_delay_ms: float = field(0.0, "benchmarks only: hold every incoming RPC this long")
    preload: tuple[str, ...] = field((), "models to load at start (name or name:version:precision); one the "
                                         "registry does not hold yet loads when it announces it (once)")
    shard_index: int = field(0, "federated learning: which shard of the training data this node holds")
    shard_count: int = field(1, "federated learning: how many shards the training data is cut into")
    shard_mode: str = field("iid", "federated learning: iid | label_skew (few labels per node)")
    train_workers: int = field(1, "threads running local training rounds")

    @property
    def measured_class(self) -> str:
        return self.node_class or self.tier

    @property
    def address(self) -> str:
        return f"{self.advertise_host or self.host}:{self.port}"


# byte bounds where 0 has a meaning of its own and a value below 0 would silently bound nothing
BYTE_BOUNDS = {"outbox_max_bytes": "0: only the 100000-event bound", "disk_cache_max_bytes": "0: no limit"}


def check(prefix: str, settings: RuntimeSettings) -> None:
    """Stop (SystemExit naming the variable) before starting on a byte bound below 0 (`BYTE_BOUNDS`)."""
    for name, zero in BYTE_BOUNDS.items():
        if (value := getattr(settings, name)) < 0:
            raise SystemExit(f"{prefix}{name.upper()} ({value}) must be 0 or more ({zero})")
