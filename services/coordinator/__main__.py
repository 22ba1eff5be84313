"""Coordinator composition root: registry client + node view -> core -> gRPC/REST adapters."""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

from redis.asyncio import Redis

from services.common import events, grpc_util, lifecycle, telemetry, tls, triton_metrics
from services.common import settings as cfg
from services.common.background import Background
from services.common.bus import EventBus
from services.common.errors import CneiError
from services.common.jobs import JobStore
from services.common.nodes import NodeDirectory
from services.common.oip_servicer import OipServicer
from services.common.rest_server import RestServer
from services.common.node_control import NodeControlClients
from services.common import registry_client
from services.common import restricted as restricted_apis
from services.common.log_settings import LogConfig, LogSettings
from services.common.shm import SharedMemoryRegions
from services.common.trace_settings import RedisTraceStore, TraceSettings, config_from
from services.coordinator.catalog import Catalog
from services.coordinator.core import Coordinator
from services.coordinator.door import DoorRoutes
from services.coordinator.door_process import DoorProcess, door_binary
from services.coordinator.door_servicer import FrontDoorServicer
from services.coordinator.door_tls import DoorTls
from services.coordinator.nodes_view import NodesView
from services.coordinator.repository import ModelControl
from services.coordinator.rest import build_app, status_routes
from services.coordinator.settings import PREFIX, CoordinatorSettings
from services.coordinator.stats_share import StatsShare
from services.coordinator.workers import supervise, worker_count
from services.pb.cnei import frontdoor_pb2_grpc as fd_grpc
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("services.coordinator")


async def serve(settings: CoordinatorSettings, door_path: Path | None = None) -> None:
    """One coordinator process; with `door_path`, behind the compiled front door it starts."""
    stop = lifecycle.stop_event()
    registry = registry_client.from_settings(PREFIX, settings, timeout=5.0)
    redis = Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    node_headers = restricted_apis.headers(settings.node_headers)
    node_tls = tls.node_tls(PREFIX, settings)
    # one channel per node, for inference and health (the view) and loads (node control)
    node_channels = grpc_util.Channels(node_headers, node_tls)
    nodes = NodesView(NodeDirectory(redis), settings.node_refresh_s, channels=node_channels, tls=node_tls)
    await nodes.start()
    catalog = Catalog(registry, settings.resolve_ttl_s, settings.registry_timeout_s)
    worker = settings.worker_index
    source = "coordinator" if worker < 0 else f"coordinator-{worker}"
    bus = EventBus(settings.nats_url, source, outbox=settings.outbox_path or None, stream=settings.stream_limits())
    await bus.start()
    core = Coordinator(settings, catalog, nodes, publish=bus.publish)
    node_control = NodeControlClients(node_channels)
    core.control = ModelControl(core, redis, node_control, settings.resolve_ttl_s)
    nodes.on_change = core.node_changed
    sharing = None
    if settings.shared_dir and worker >= 0:  # one of several workers: statistics add up
        core.stats_view = StatsShare(settings.shared_dir, worker, core.stats)
        sharing = asyncio.create_task(core.stats_view.run(), name="stats-share")
    # Triton's trace settings, shared through Redis by the processes serving this OIP port (the
    # workers of one coordinator, its replicas behind one service); set from this configuration
    # when the coordinator (or worker 0 of several) starts
    tracing = TraceSettings(RedisTraceStore(redis, f"cnei:trace:settings:{settings.grpc_port}"),
                            configured=config_from(settings.trace_level, settings.trace_rate, settings.trace_count))
    logs = LogSettings(redis, f"cnei:log:settings:{settings.grpc_port}")  # Triton's log settings, likewise
    if worker <= 0:
        await tracing.reset()
        await logs.reset(LogConfig.from_level(logging.getLogger().getEffectiveLevel()))
    following = asyncio.create_task(logs.follow(), name="log-settings")
    restricted = restricted_apis.parse(settings.restricted_apis)
    guard = [restricted_apis.RestrictedApis(restricted)] if restricted else None
    routes = None
    public_tls = tls.server_tls(PREFIX, settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    if door_path is None:
        server = lifecycle.GrpcServer(settings.host, settings.grpc_port, reuse_port=worker >= 0, interceptors=guard,
                                      credentials=tls.grpc_server_credentials(public_tls) if public_tls else None,
                                      reflection=settings.grpc_reflection)
    else:  # the door takes the public port; the coordinator serves it from behind
        server = lifecycle.GrpcServer("127.0.0.1", settings.internal_grpc_port, interceptors=guard,
                                      reflection=settings.grpc_reflection)  # the door passes it through
        door_dir = Path(tempfile.mkdtemp(prefix="cnei-door-"))  # what the coordinator tells its door by file
        routes = DoorRoutes(core, settings.route_ttl_ms, tracing if telemetry.exporting() else None,
                            settings.door_spread_nodes, settings.door_spread_margin, door_dir / "routes-generation",
                            confirm_timeout_s=max(1.0, 5 * settings.door_report_ms / 1e3))
        core.after_repository_change = routes.forget_at_door  # answered once the door dropped them too
        # the door's own link, which its public port refuses: reflection (passed through) leaves it out
        server.add(fd_grpc.add_FrontDoorControlServicer_to_server, FrontDoorServicer(routes),
                   "cnei.frontdoor.v1.FrontDoorControl", listed=False)
    # system shared memory registrations: files that every worker, or the front door, reads too
    shm_dir = ""
    if settings.shared_dir and worker >= 0:
        shm_dir = str(Path(settings.shared_dir) / "shm")
    elif door_path is not None:
        shm_dir = tempfile.mkdtemp(prefix="cnei-shm-")
    shm = SharedMemoryRegions(shm_dir, enabled=settings.shared_memory)
    await subscribe(bus, catalog, core, source, routes)
    server.add(pb_grpc.add_GRPCInferenceServiceServicer_to_server, OipServicer(core, shm, tracing, logs),
               "inference.GRPCInferenceService")
    rest = None
    if worker <= 0:  # REST and the status page: the only process, or worker 0 of several
        rest = RestServer(build_app(core, status_routes(core, JobStore(redis)), shm, tracing, logs, restricted),
                          settings.host, settings.http_port,
                          tls.server_ssl_context(public_tls) if public_tls else None)
        await rest.start()
    if worker < 0:  # several workers: the supervisor serves Triton's metrics over all of them
        triton_metrics.register(lambda: core.stats_view.select())
    telemetry.start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    door = watching = copying = None
    if door_path is not None:
        door_tls = DoorTls(public_tls, door_dir) if public_tls else None  # the door reads checked copies
        door = DoorProcess(door_path, f"{settings.host}:{settings.grpc_port}", server.address, settings.door_report_ms,
                           shm_dir if settings.shared_memory else "", restricted.get("inference"),
                           settings.response_cache_bytes, door_tls.files if door_tls else None,
                           routes.generation_file, node_headers, node_tls)
        door.start()
        watching = asyncio.create_task(door.watch(stop), name="front-door")
        if door_tls is not None:
            copying = asyncio.create_task(door_tls.run(stop), name="front-door-tls")
    log.info("%s serving gRPC on %s%s", source, server.address,
             f", REST on {rest.address}" if rest else "")
    await stop.wait()
    log.info("%s shutting down", source)
    if door is not None:  # first: the door hands what it holds to the coordinator, still serving
        await lifecycle.cancel_and_wait(copying)
        await watching
        await door.stop()
    await server.stop()
    if rest is not None:  # the requests in flight over REST answered too, before the core closes
        await rest.stop()
    await core.close()  # the node channels too
    shm.close()
    if door_path is not None:  # registrations end with the server, as in Triton
        shutil.rmtree(shm_dir, ignore_errors=True)
        shutil.rmtree(routes.generation_file.parent, ignore_errors=True)
    await lifecycle.cancel_and_wait(following, sharing)
    if sharing is not None:
        core.stats_view.write()
    await nodes.close()
    await bus.close()
    await redis.aclose()
    await catalog.close()
    await registry.close()
    telemetry.shutdown()


async def subscribe(bus: EventBus, catalog: Catalog, core: Coordinator, source: str,
                    routes: DoorRoutes | None = None) -> None:
    """Registry changes and model control invalidate the catalog and the front door's routes of
    the model; worker 0 of several also lists the other workers' failovers on its status page."""
    def model_of(envelope: events.Envelope) -> str:
        return envelope.payload.get("name") or envelope.payload.get("model", "")

    def forget_routes(envelope: events.Envelope) -> None:
        if routes is not None:
            routes.forget(model_of(envelope))

    async def on_model_event(envelope: events.Envelope) -> None:
        catalog.apply_event(envelope.type, envelope.payload)
        forget_routes(envelope)

    async def on_peer_failover(envelope: events.Envelope) -> None:
        if envelope.source.startswith("coordinator-") and envelope.source != source:
            core.recent.append(failover_row(envelope))

    async def on_model_control(envelope: events.Envelope) -> None:
        core.control.forget()  # this or another coordinator (or worker) loaded or unloaded a model
        forget_routes(envelope)

    warming = Background()

    async def push_canary(model: str) -> None:
        """A rollout's canary is loaded on the model's nodes before its share of traffic reaches
        them (one coordinator process does it; loading is idempotent on a node)."""
        try:
            canary = (await catalog.deployment(model)).rollout.canary
            if canary and core.control is not None:
                loaded = await core.control.warm(await core.model_variant(model, canary))
                log.info("canary %s v%s pushed to %s", model, canary, ",".join(loaded) or "no node")
        except CneiError as exc:
            log.warning("canary of %s not pushed to the nodes: %s", model, exc.message)

    async def on_deployment(envelope: events.Envelope) -> None:
        await on_model_event(envelope)
        if source in ("coordinator", "coordinator-0"):
            warming.spawn(push_canary(model_of(envelope)))

    await bus.subscribe(events.MODEL_PUBLISHED, on_model_event)
    await bus.subscribe(events.MODEL_DELETED, on_model_event)
    await bus.subscribe(events.MODEL_LOADED, on_model_control)
    await bus.subscribe(events.MODEL_UNLOADED, on_model_control)
    await bus.subscribe(events.DEPLOYMENT_UPDATED, on_deployment)
    if source == "coordinator-0":
        await bus.subscribe(events.REQUEST_FAILOVER, on_peer_failover)


def failover_row(envelope: events.Envelope) -> dict:
    p = envelope.payload
    return {"kind": "failover", "time": envelope.time, "model": p.get("model", ""),
            "from": p.get("from_node", ""), "to": p.get("to_node", ""), "reason": p.get("reason", "")}


def main() -> None:
    settings = cfg.load_at_start(CoordinatorSettings, PREFIX)
    restricted_apis.check(PREFIX, settings.restricted_apis, restricted_apis.OIP_API, settings.registry_headers,
                          settings.node_headers)
    tls.check_client("coordinator", PREFIX, "REGISTRY", settings)
    tls.check_server("coordinator", PREFIX, settings)
    tls.check_client("coordinator", PREFIX, "NODE", settings)
    count = worker_count(settings.workers)
    try:
        door_path = door_binary(settings.front_door, settings.front_door_binary) if settings.worker_index < 0 else None
    except CneiError as exc:
        raise SystemExit(f"coordinator: {exc.message}") from None
    if door_path is not None and count > 1:
        log.warning("the front door serves gRPC: running one coordinator process, not %d workers", count)
    elif settings.worker_index < 0 and count > 1:
        telemetry.setup("cnei-coordinator-supervisor")
        lifecycle.run_service(supervise(settings, count), event_loop=settings.event_loop)
        return
    telemetry.setup("cnei-coordinator")
    if settings.supervisor_pid:
        lifecycle.stop_with_parent(settings.supervisor_pid)
    lifecycle.run_service(serve(settings, door_path), event_loop=settings.event_loop)


if __name__ == "__main__":
    main()
