"""Registry composition root: store -> core -> gRPC adapter; clean shutdown on SIGTERM."""
from __future__ import annotations

import logging
from pathlib import Path

from services.common import lifecycle, restricted, telemetry, tls
from services.common import settings as cfg
from services.common.bus import EventBus
from services.pb.cnei import registry_pb2_grpc as rpb_grpc
from services.registry.core import Registry
from services.registry.servicer import RegistryServicer
from services.registry.settings import PREFIX, RegistrySettings, check
from services.registry.store import RegistryStore

log = logging.getLogger("services.registry")


async def serve(settings: RegistrySettings) -> None:
    stop = lifecycle.stop_event()
    store = RegistryStore(settings.data_dir)
    bus = EventBus(settings.nats_url, "registry", outbox=Path(settings.data_dir) / "outbox.jsonl",
                   stream=settings.stream_limits())
    await bus.start()
    registry = Registry(store, bus.publish, settings.max_artifact_bytes, settings.tombstone_retention_days,
                        settings.concurrent_checks)
    own_tls = tls.server_tls(PREFIX, settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    server = lifecycle.GrpcServer(settings.host, settings.port,
                                  interceptors=restricted.guard(settings.restricted_apis, restricted.REGISTRY_API),
                                  credentials=tls.grpc_server_credentials(own_tls) if own_tls else None,
                                  reflection=settings.grpc_reflection)
    server.add(rpb_grpc.add_ModelRegistryServicer_to_server, RegistryServicer(registry),
               "cnei.registry.v1.ModelRegistry")
    telemetry.start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    log.info("registry serving on %s%s (data in %s)", server.address,
             "" if own_tls is None else " (mutual TLS)" if own_tls.mutual else " (TLS)", settings.data_dir)
    await stop.wait()
    log.info("registry shutting down")
    await server.stop()
    await registry.close()  # pushes being catalogued are announced before the bus closes
    await bus.close()
    store.close()
    telemetry.shutdown()


def main() -> None:
    settings = cfg.load_at_start(RegistrySettings, PREFIX)
    restricted.check(PREFIX, settings.restricted_apis, restricted.REGISTRY_API)
    check(PREFIX, settings)
    tls.check_server("registry", PREFIX, settings)
    telemetry.setup("cnei-registry")
    lifecycle.run_service(serve(settings), event_loop=settings.event_loop)


if __name__ == "__main__":
    main()
