"""Tracing, logging and metrics set-up shared by every service (OTLP, W3C context, Prometheus)."""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from prometheus_client import start_http_server

from services.common import settings as cfg

_provider: TracerProvider | None = None
_exporting = False


@dataclass(frozen=True)
class TelemetrySettings:
    """Standard OpenTelemetry variables (read without a prefix)."""

    otel_exporter_otlp_endpoint: str = cfg.field("", "OTLP gRPC endpoint; empty disables export")
    otel_service_version: str = cfg.field("0.1.0", "service.version resource attribute")
    cnei_log_level: str = cfg.field("INFO", "log level for every service")


class JsonFormatter(logging.Formatter):
    """JSON-lines log records carrying the current trace and span ids."""

    def format(self, record: logging.LogRecord) -> str:
        span = trace.get_current_span().get_span_context()
        line = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if span.is_valid:
            line["trace_id"] = format(span.trace_id, "032x")
            line["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup(service_name: str, settings: TelemetrySettings | None = None) -> TracerProvider:
    """Install logging and the tracer provider (with OTLP export when an endpoint is set)."""
    global _provider, _exporting
    settings = settings or cfg.load(TelemetrySettings, "")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.cnei_log_level.upper())
    resource = Resource.create(
        {"service.name": service_name, "service.version": settings.otel_service_version}
    )
    # Without an exporter nothing is recorded unless a caller's context says it is sampled, but
    # every span still gets ids, so W3C context keeps flowing to services that do export.
    exporting = _exporting = bool(settings.otel_exporter_otlp_endpoint)
    _provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON if exporting else ALWAYS_OFF))
    if exporting:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otel_exporter_otlp_endpoint, insecure=True)
        _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(_provider)
    return _provider


def exporting() -> bool:
    """Whether spans are exported (setup() found an OTLP endpoint)."""
    return _exporting


def shutdown() -> None:
    """Flush and stop span export."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=3000)
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject(carrier: dict[str, str] | None = None) -> dict[str, str]:
    """Current trace context as W3C headers (for gRPC metadata and NATS headers)."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """Trace context from W3C headers (gRPC metadata or NATS headers)."""
    return propagate.extract(dict(headers or {}))


def start_metrics_server(host: str, port: int) -> None:
    """Serve the Prometheus registry on http://host:port/metrics (port 0 disables)."""
    if port:
        start_http_server(port, addr=host)


def attach(ctx: otel_context.Context) -> object:
    return otel_context.attach(ctx)


def detach(token: object) -> None:
    otel_context.detach(token)
