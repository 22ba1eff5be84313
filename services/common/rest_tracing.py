"""Server spans of the OIP REST adapter, as gRPC's rpc wrapper makes them: in the caller's W3C
trace context (`traceparent`), and for an inference that came without one, in a trace the trace
settings start (one in `trace_rate` of the model, while `trace_level` is on and the count lasts)."""
from __future__ import annotations

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common import telemetry
from services.common.trace_settings import TraceSettings

_tracer = trace.get_tracer(__name__)


def route_of(request: web.Request) -> str:
    """The route a request matched (`/v2/models/{model}/infer`), '' for none (a 404): span names
    never carry what a client put in a path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else ""


def is_inference(request: web.Request, route: str) -> bool:
    return request.method == "POST" and route.endswith("/infer")


async def parent_context(request: web.Request, route: str, tracing: TraceSettings) -> otel_context.Context:
    """The context a request's server span starts in: its caller's; for an inference without one
    while spans are exported, a new trace when the trace settings pick it; otherwise one that is
    not sampled (calls other than inference start no traces of their own: health probes, the
    status page's polls)."""
    parent = telemetry.extract(request.headers)
    if not (telemetry.exporting() and is_inference(request, route)):
        return parent if telemetry.has_span(parent) else telemetry.unsampled_context(parent)
    return await telemetry.picked_parent(parent, lambda: tracing.pick(request.match_info.get("model", "")), route)


def tracing_middleware(tracing: TraceSettings):
    """An aiohttp middleware (outermost, so it sees the reply the client gets) making each
    request's server span, named after its method and route."""
    @web.middleware
    async def traced(request: web.Request, handler):
        route = route_of(request)
        parent = await parent_context(request, route, tracing)
        with _tracer.start_as_current_span(
            f"{request.method} {route}".rstrip(), context=parent, kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route},
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # a redirect, passed on by errors_middleware
                _answered(span, exc.status)
                raise
            except BaseException as exc:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            _answered(span, response.status)
            return response
    return traced


def _answered(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
