"""Every service's Prometheus endpoint: its registry at /metrics on the metrics port, 404 at any
other path (prometheus_client's own server answers every path with the metrics, so a probe
pointed at the wrong port, such as GET /v2/health/ready, always passed)."""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.registry import Collector

METRICS_PATH = "/metrics"

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


def metrics_app(registry: Collector = REGISTRY) -> WsgiApp:
    """A WSGI app serving `registry` at /metrics and 404 elsewhere."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") == METRICS_PATH:
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found: metrics are served at {METRICS_PATH}\n".encode()]

    return app


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: object) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _family(host: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


def start_metrics_server(host: str, port: int, registry: Collector = REGISTRY) -> WSGIServer | None:
    """Serve `registry` on http://host:port/metrics from a daemon thread (port 0 disables)."""
    if not port:
        return None
    server_class = type("MetricsServer", (_ThreadingServer,), {"address_family": _family(host, port)})
    server = make_server(host, port, metrics_app(registry), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
