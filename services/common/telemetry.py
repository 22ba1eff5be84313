"""Tracing, logging and metrics set-up shared by every service (OTLP, W3C context, Prometheus)."""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from services.common import metrics_http
from services.common import settings as cfg

_provider: TracerProvider | None = None
_exporting = False

log = logging.getLogger(__name__)


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


def unsampled(context: otel_context.Context | None = None) -> bool:
    """The current span (or `context`'s) belongs to a trace that is not sampled. Under
    ParentBased sampling no child of it is recorded either, so hot paths make none."""
    span_context = trace.get_current_span(context).get_span_context()
    return span_context.is_valid and not span_context.trace_flags.sampled


def child_span(tracer: trace.Tracer, name: str, context: otel_context.Context | None = None,
               **kwargs) -> AbstractContextManager[trace.Span]:
    """`tracer.start_as_current_span(name, context, ...)`, except in an unsampled trace: then
    the parent (made current when `context` is given) stands in for the child, which would not
    be recorded anyway and costs ~20 µs of CPU to make. Context still flows downstream."""
    if not unsampled(context):
        return tracer.start_as_current_span(name, context=context, **kwargs)
    return _Within(context)


class _Within:
    """The stand-in for a child span: the parent span, with `context` current while it lasts."""

    __slots__ = ("context", "token")

    def __init__(self, context: otel_context.Context | None) -> None:
        self.context = context
        self.token = None

    def __enter__(self) -> trace.Span:
        if self.context is not None:
            self.token = otel_context.attach(self.context)
        return trace.get_current_span()

    def __exit__(self, *exc) -> None:
        if self.token is not None:
            otel_context.detach(self.token)


def inject(carrier: dict[str, str] | None = None) -> dict[str, str]:
    """Current trace context as W3C headers (for gRPC metadata and NATS headers)."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """Trace context from W3C headers (gRPC metadata or NATS headers)."""
    return propagate.extract(dict(headers or {}))


def start_metrics_server(host: str, port: int) -> None:
    """Serve the Prometheus registry on http://host:port/metrics, 404 at other paths (port 0 disables)."""
    metrics_http.start_metrics_server(host, port)


def caller_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The caller's trace context, or, when it sent none, an unsampled one: a request its caller
    did not trace starts no trace here either (an internal hop makes no root spans), while its
    log lines still carry ids."""
    ctx = extract(headers)
    return ctx if has_span(ctx) else unsampled_context(ctx)


def has_span(ctx: otel_context.Context) -> bool:
    """`ctx` carries a caller's span (its trace decides whether children are recorded)."""
    return trace.get_current_span(ctx).get_span_context().is_valid


def unsampled_context(ctx: otel_context.Context | None = None) -> otel_context.Context:
    """`ctx` under a fresh trace that is not sampled: spans started in it are not recorded (under
    ParentBased sampling), while log lines still carry ids."""
    untraced = trace.SpanContext(trace_id=random.getrandbits(128) or 1, span_id=random.getrandbits(64) or 1,
                                 is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT))
    return trace.set_span_in_context(trace.NonRecordingSpan(untraced), ctx)


async def picked_parent(parent: otel_context.Context, pick: Callable[[], Awaitable[bool]],
                        where: str) -> otel_context.Context:
    """The context a server span starts in for a call that may start a trace (trace settings):
    `parent` when it carries a caller's span or `pick()` says to trace, else an unsampled one in
    it; a `pick` that fails is logged (naming `where`) and traces nothing."""
    if has_span(parent):
        return parent
    try:
        traced = await pick()
    except Exception:  # noqa: BLE001 - a sampling failure must not fail the request
        log.warning("%s: trace sampling failed; not traced", where, exc_info=True)
        traced = False
    return parent if traced else unsampled_context(parent)


def attach(ctx: otel_context.Context) -> object:
    return otel_context.attach(ctx)


def detach(token: object) -> None:
    otel_context.detach(token)
