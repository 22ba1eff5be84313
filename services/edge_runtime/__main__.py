"""Runtime composition root: caches, registry client, ORT core, OIP + control servers, heartbeat."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import events, lifecycle, telemetry, tls, triton_metrics
from services.common import settings as cfg
from services.common.bus import EventBus
from services.common.errors import InvalidArgument
from services.common.fastlane import FastServer
from services.common.nodes import NodeDirectory
from services.common.oip_servicer import OipServicer
from services.common.outbox import Outbox
from services.common import restricted as restricted_apis
from services.common.shm import SharedMemoryRegions
from services.common.trace_settings import MemoryTraceStore, TraceSettings, config_from
from services.common import registry_client
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.control import NodeControlServicer
from services.edge_runtime.emulation import DelayInterceptor
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.federated import LocalTrainer
from services.edge_runtime.heartbeat import Heartbeat, check_settings as check_heartbeat
from services.edge_runtime.heartbeat import redis_client
from services.edge_runtime.preload import Preload
from services.edge_runtime.rest import rest_server
from services.edge_runtime.settings import PREFIX, RuntimeSettings, check as check_settings
from services.pb.cnei import node_pb2_grpc as npb_grpc
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("services.edge_runtime")
_tracer = trace.get_tracer(__name__)


def fast_handler(servicer: OipServicer, emulated_delay_ms: float = 0.0):
    """The fast lane's handler: the same ModelInfer path as gRPC, under a server span when the
    caller traces the request (and the same emulated ingress delay, for benchmarks)."""
    async def handle(payload: bytes, timeout: float | None) -> bytes:
        if emulated_delay_ms > 0:
            await asyncio.sleep(emulated_delay_ms / 1000.0)
        try:
            request = pb.ModelInferRequest.FromString(payload)
        except DecodeError as exc:
            raise InvalidArgument(f"fast-lane request is not a ModelInferRequest: {exc}") from None
        with telemetry.child_span(_tracer, "fastlane/ModelInfer", kind=SpanKind.SERVER):
            reply = await servicer.infer_message(request, timeout)
        return reply.SerializeToString()
    return handle


async def serve(settings: RuntimeSettings) -> None:
    stop = lifecycle.stop_event()
    registry = registry_client.from_settings(PREFIX, settings, timeout=3.0)
    runtime = EdgeRuntime(settings, registry, DiskCache(settings.cache_dir, settings.disk_cache_max_bytes))
    redis = redis_client(settings)
    bus = EventBus(settings.nats_url, f"runtime/{settings.node_id}",
                   outbox=Outbox(Path(settings.cache_dir) / "outbox.jsonl", max_bytes=settings.outbox_max_bytes),
                   stream=settings.stream_limits())

    preload = Preload(runtime, settings.preload)

    async def on_published(envelope: events.Envelope) -> None:
        name = envelope.payload.get("name", "")
        await runtime.model_published(name)
        await preload.model_published(name)  # a model named for preload not registered at start loads now

    async def on_deployment(envelope: events.Envelope) -> None:
        await runtime.model_deployed(envelope.payload.get("model", ""))

    async def on_deleted(envelope: events.Envelope) -> None:
        p = envelope.payload
        await runtime.model_deleted(p.get("name", ""), p.get("version", ""), list(p.get("precisions", [])))

    async def on_connect() -> None:
        await runtime.resync()  # forgets what was deleted while it was away, as at start
        await preload.retry()  # then loads what was named for preload and pushed meanwhile

    await bus.subscribe(events.MODEL_PUBLISHED, on_published)
    await bus.subscribe(events.MODEL_DELETED, on_deleted)
    await bus.subscribe(events.DEPLOYMENT_UPDATED, on_deployment)
    bus.on_connect.append(on_connect)
    await bus.start()
    if not bus.connected:  # no connect resync to forget what was deleted while it was stopped
        runtime.background.spawn(runtime.forget_deleted())
    interceptors = [DelayInterceptor(settings.emulated_delay_ms)] if settings.emulated_delay_ms > 0 else []
    interceptors += restricted_apis.guard(settings.restricted_apis, restricted_apis.RUNTIME_API)
    own_tls = tls.server_tls(PREFIX, settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    server = lifecycle.GrpcServer(settings.host, settings.port, interceptors=interceptors,
                                  credentials=tls.grpc_server_credentials(own_tls) if own_tls else None,
                                  reflection=settings.grpc_reflection)
    tracing = TraceSettings(MemoryTraceStore(config_from(settings.trace_level, settings.trace_rate,
                                                         settings.trace_count)))
    oip_servicer = OipServicer(runtime, SharedMemoryRegions(enabled=settings.shared_memory), tracing)
    server.add(pb_grpc.add_GRPCInferenceServiceServicer_to_server, oip_servicer,
               "inference.GRPCInferenceService")
    restricted = restricted_apis.parse(settings.restricted_apis,
                                       restricted_apis.categories_of(restricted_apis.RUNTIME_API))
    rest = rest_server(settings, oip_servicer, restricted, tls.server_ssl_context(own_tls) if own_tls else None)
    fast = None
    if settings.fast_lane:  # the data plane takes the inference API's key, if it has one
        refuse = (lambda headers: restricted_apis.refusal(restricted, "inference", headers)) if restricted else None
        fast = FastServer(fast_handler(oip_servicer, settings.emulated_delay_ms), refuse,
                          tls.server_ssl_context(own_tls) if own_tls else None)
    trainer = LocalTrainer(settings)
    server.add(npb_grpc.add_NodeControlServicer_to_server, NodeControlServicer(runtime, trainer),
               "cnei.node.v1.NodeControl")
    triton_metrics.register(lambda: runtime.stats.select())
    telemetry.start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    if rest is not None:
        await rest.start()
    await preload.start()
    heartbeat = Heartbeat(settings, runtime, NodeDirectory(redis), bus)
    if fast is not None:
        fast_port = await fast.start(settings.host, settings.fast_port)
        heartbeat.fast_address = f"{settings.advertise_host or settings.host}:{fast_port}"
    heartbeat.start()
    log.info("runtime %s (%s, %s) serving on %s%s", settings.node_id, settings.tier,
             settings.region, server.address, f", REST on {rest.address}" if rest else "")
    await stop.wait()
    log.info("runtime %s shutting down", settings.node_id)
    trainer.stop()  # a round in training ends at its next mini-batch, not after its epochs
    await heartbeat.stop()
    # every port at once: each refuses new requests (UNAVAILABLE; REST closes its port) and
    # answers those it holds
    await asyncio.gather(server.stop(), *(lane.stop() for lane in (fast, rest) if lane is not None))
    await runtime.drain()
    runtime.close()
    oip_servicer.shm.close()
    trainer.close()
    await bus.close()
    await redis.aclose()
    await registry.close()
    telemetry.shutdown()


def main() -> None:
    settings = cfg.load_at_start(RuntimeSettings, PREFIX)
    restricted_apis.check(PREFIX, settings.restricted_apis, restricted_apis.RUNTIME_API, settings.registry_headers)
    tls.check_client("runtime", PREFIX, "REGISTRY", settings)
    check_heartbeat(PREFIX, settings)
    check_settings(PREFIX, settings)
    tls.check_server("runtime", PREFIX, settings)
    telemetry.setup(f"cnei-runtime-{settings.tier}")
    lifecycle.run_service(serve(settings), event_loop=settings.event_loop)


if __name__ == "__main__":
    main()
