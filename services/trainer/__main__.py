"""Trainer composition root: Redis, registry, NATS -> federated core -> gRPC adapter; clean shutdown."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from redis.asyncio import Redis

from services.common import grpc_util, lifecycle, restricted, telemetry, tls
from services.common import settings as cfg
from services.common.bus import EventBus
from services.common.jobs import JobStore
from services.common.nodes import NodeDirectory
from services.common import registry_client
from services.pb.cnei import trainer_pb2_grpc as tpb_grpc
from services.trainer.clients import NodeClients
from services.trainer.core import FederatedTrainer
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import PREFIX, TrainerSettings, check

log = logging.getLogger("services.trainer")


async def serve(settings: TrainerSettings) -> None:
    stop = lifecycle.stop_event()
    registry = registry_client.from_settings(PREFIX, settings, timeout=10.0)
    redis = Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    bus = EventBus(settings.nats_url, "trainer", outbox=Path(settings.data_dir) / "outbox.jsonl",
                   stream=settings.stream_limits())
    await bus.start()
    clients = NodeClients(grpc_util.Channels(restricted.headers(settings.node_headers), tls.node_tls(PREFIX, settings)))
    trainer = FederatedTrainer(settings, JobStore(redis, settings.job_ttl_s), NodeDirectory(redis),
                               clients.train, registry, bus.publish)
    own_tls = tls.server_tls(PREFIX, settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    server = lifecycle.GrpcServer(settings.host, settings.port,
                                  interceptors=restricted.guard(settings.restricted_apis, restricted.TRAINER_API),
                                  credentials=tls.grpc_server_credentials(own_tls) if own_tls else None,
                                  reflection=settings.grpc_reflection)
    server.add(tpb_grpc.add_TrainerServicer_to_server, TrainerServicer(trainer), "cnei.trainer.v1.Trainer")
    telemetry.start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    log.info("trainer serving on %s", server.address)
    resumer = asyncio.create_task(trainer.keep_resuming())  # jobs left by trainers that stopped or died
    await stop.wait()
    log.info("trainer shutting down")
    await lifecycle.cancel_and_wait(resumer)
    # StartJob is UNAVAILABLE from here (starts under way are refused or waited for); running jobs are
    # suspended after their last round, for the next trainer. The server stops after, so that WatchJob
    # streams see their jobs suspended; its health says NOT_SERVING meanwhile.
    await server.draining()
    await trainer.close()
    await server.stop(settings.shutdown_grace_s)
    await clients.close()
    await bus.close()
    await redis.aclose()
    await registry.close()
    telemetry.shutdown()


def main() -> None:
    settings = cfg.load_at_start(TrainerSettings, PREFIX)
    check(settings)
    restricted.check(PREFIX, settings.restricted_apis, restricted.TRAINER_API, settings.registry_headers,
                     settings.node_headers)
    tls.check_client("trainer", PREFIX, "REGISTRY", settings)
    tls.check_server("trainer", PREFIX, settings)
    tls.check_client("trainer", PREFIX, "NODE", settings)
    telemetry.setup("cnei-trainer")
    lifecycle.run_service(serve(settings), event_loop=settings.event_loop)


if __name__ == "__main__":
    main()
