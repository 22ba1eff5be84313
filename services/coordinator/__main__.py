"""Coordinator composition root: registry client + node view -> core -> gRPC/REST adapters."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from redis.asyncio import Redis

from services.common import events, lifecycle, telemetry
from services.common import settings as cfg
from services.common.bus import EventBus
from services.common.jobs import JobStore
from services.common.nodes import NodeDirectory
from services.common.oip_servicer import OipServicer
from services.common.registry_client import RegistryClient
from services.coordinator.catalog import Catalog
from services.coordinator.core import Coordinator
from services.coordinator.nodes_view import NodesView
from services.coordinator.rest import build_app, status_routes
from services.coordinator.settings import PREFIX, CoordinatorSettings
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("services.coordinator")


async def serve(settings: CoordinatorSettings) -> None:
    stop = lifecycle.stop_event()
    registry = RegistryClient(settings.registry_target, timeout=5.0)
    redis = Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    nodes = NodesView(NodeDirectory(redis), settings.node_refresh_s)
    await nodes.start()
    catalog = Catalog(registry, settings.resolve_ttl_s)
    bus = EventBus(settings.nats_url, "coordinator", outbox=settings.outbox_path or None)
    await bus.start()
    core = Coordinator(settings, catalog, nodes, publish=bus.publish)
    nodes.on_change = core.node_changed

    async def on_model_event(envelope: events.Envelope) -> None:
        catalog.forget(envelope.payload.get("name") or envelope.payload.get("model", ""))

    await bus.subscribe(events.MODEL_PUBLISHED, on_model_event)
    await bus.subscribe(events.DEPLOYMENT_UPDATED, on_model_event)
    server = lifecycle.GrpcServer(settings.host, settings.grpc_port)
    server.add(pb_grpc.add_GRPCInferenceServiceServicer_to_server, OipServicer(core),
               "inference.GRPCInferenceService")
    runner = web.AppRunner(build_app(core, status_routes(core, JobStore(redis))), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.http_port).start()
    telemetry.start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    log.info("coordinator serving gRPC on %s, REST on %s:%d", server.address, settings.host,
             settings.http_port)
    await stop.wait()
    log.info("coordinator shutting down")
    await server.stop()
    await core.close()
    await runner.cleanup()
    await nodes.close()
    await bus.close()
    await redis.aclose()
    await registry.close()
    telemetry.shutdown()


def main() -> None:
    settings = cfg.load(CoordinatorSettings, PREFIX)
    telemetry.setup("cnei-coordinator")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
