"""A service's REST port: an aiohttp app on host:port, started and stopped by its composition root
beside its gRPC server."""
from __future__ import annotations

import logging
import ssl

from aiohttp import web

log = logging.getLogger(__name__)


class RestServer:
    """`app` served on host:port (TLS when given an ssl context). A client that hangs up cancels
    its handler (which takes its request out of a batcher's queue, as over gRPC); `stop` closes
    the port and lets the requests in flight finish within `grace_s`, then cancels them."""

    def __init__(self, app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                 grace_s: float = 5.0):
        self.host, self.port, self.ssl_context = host, port, ssl_context
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=grace_s)
        self.started = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl_context).start()
        except BaseException:
            await self.runner.cleanup()
            raise
        self.started = True

    async def stop(self) -> None:
        if self.started:
            self.started = False
            await self.runner.cleanup()
