"""The runtime's REST port: the shared OIP REST v2 adapter (services.common.oip_rest) over this
node's core, with the gRPC port's shared-memory regions, trace and log settings, restricted APIs
and TLS, so a client sees one server whichever protocol it speaks."""
from __future__ import annotations

import ssl
from collections.abc import Mapping

from services.common.oip_rest import build_app
from services.common.oip_servicer import OipServicer
from services.common.restricted import Key
from services.common.rest_server import RestServer
from services.edge_runtime.settings import RuntimeSettings


def rest_server(settings: RuntimeSettings, servicer: OipServicer, restricted: Mapping[str, Key],
                ssl_context: ssl.SSLContext | None) -> RestServer | None:
    """The REST server of `settings.http_port` over the gRPC servicer's core and settings (None
    when the port is 0)."""
    if not settings.http_port:
        return None
    app = build_app(servicer.core, shm=servicer.shm, tracing=servicer.tracing, logs=servicer.logs,
                    restricted=restricted)
    return RestServer(app, settings.host, settings.http_port, ssl_context)
