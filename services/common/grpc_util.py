"""gRPC plumbing for every service: error mapping, server spans and metrics, traced client channels."""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram

from services.common import telemetry
from services.common.tls import ClientTls, server_name_options
from services.common.errors import CneiError, ErrorCode, error_for

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    # A peer that comes back (registry restart, end of a partition) is found within ~1 s,
    # instead of after gRPC's default exponential backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

GRPC_STATUS = {code: getattr(grpc.StatusCode, code.value) for code in ErrorCode}
CODE_FROM_GRPC = {status: code for code, status in GRPC_STATUS.items()}

RPC_REQUESTS = Counter(
    "cnei_grpc_server_requests_total", "gRPC requests handled", ["method", "code"]
)
RPC_LATENCY = Histogram(
    "cnei_grpc_server_duration_seconds", "gRPC handling time", ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Message limits, and SO_REUSEPORT only where several processes share a port on purpose
    (otherwise a second server on a taken port must fail, not silently share it)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
    ]


def _parent_context(context: grpc.aio.ServicerContext) -> otel_context.Context:
    metadata = context.invocation_metadata() or ()
    return telemetry.extract({k: v for k, v in metadata if isinstance(v, str)})


async def _abort(context, span, method: str, exc: BaseException) -> None:
    if isinstance(exc, CneiError):
        code, message = exc.code, exc.message
    else:
        log.exception("unhandled error in %s", method, exc_info=exc)
        code, message = ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
    span.set_status(Status(StatusCode.ERROR, message))
    span.set_attribute("rpc.grpc.status_code", code.value)
    RPC_REQUESTS.labels(method, code.value).inc()
    await context.abort(GRPC_STATUS[code], message)


# How much of a refused upload is read before the refusal goes out (drain_upload)
DRAIN_MESSAGES, DRAIN_S = 256, 2.0


async def drain_upload(requests) -> None:
    """Read a client's request stream to its end (at most DRAIN_MESSAGES or DRAIN_S) before
    it is refused: grpc-python's asyncio client reports a write that fails because the server
    has already answered as INTERNAL "Internal error from Core", in place of the answer
    (grpc/grpc#36066). A unary request (no stream) is left as it is."""
    if not hasattr(requests, "__aiter__"):
        return

    async def read() -> None:
        count = 0
        async for _ in requests:
            count += 1
            if count >= DRAIN_MESSAGES:
                return
    try:
        await asyncio.wait_for(read(), DRAIN_S)
    except (asyncio.TimeoutError, grpc.RpcError, CneiError):
        pass


def rewrapped(handler: grpc.RpcMethodHandler, make) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` whose behaviour is `make(its behaviour, response
    streaming)`, with its (de)serializers (what a server interceptor hands back instead)."""
    kind = (handler.request_streaming, handler.response_streaming)
    behaviour = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                 (True, False): handler.stream_unary, (True, True): handler.stream_stream}[kind]
    build = {(True, True): grpc.stream_stream_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (False, False): grpc.unary_unary_rpc_method_handler,
             }[kind]
    return build(make(behaviour, handler.response_streaming), handler.request_deserializer,
                 handler.response_serializer)


def refusing(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind as `handler` that answers `code` with `message` (an upload read
    first: `drain_upload`); None for no handler (the method is unknown: UNIMPLEMENTED)."""
    def make(behaviour, streaming: bool):
        if streaming:
            async def stream(request_or_iterator, context):
                await context.abort(code, message)
                yield  # an async generator, as a response-streaming handler is
            return stream

        async def unary(request_or_iterator, context):
            await drain_upload(request_or_iterator)
            await context.abort(code, message)
        return unary
    return None if handler is None else rewrapped(handler, make)


def rpc(fn=None, *, sample=None):
    """Decorate a servicer method: server span from W3C metadata, metrics, errors -> status.
    `sample(self, request, metadata) -> bool` (awaited, unary methods only) decides whether a
    call that came without trace context starts a trace, while spans are exported."""
    if fn is None:
        return functools.partial(rpc, sample=sample)
    method = fn.__qualname__.replace(".", "/")

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream_wrapper(self, request, context):
            with _tracer.start_as_current_span(
                method, context=_parent_context(context), kind=SpanKind.SERVER,
                record_exception=False, set_status_on_exception=False,
            ) as span:
                try:
                    async for item in fn(self, request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await _abort(context, span, method, exc)
                RPC_REQUESTS.labels(method, "OK").inc()
        return stream_wrapper

    latency, ok = RPC_LATENCY.labels(method), RPC_REQUESTS.labels(method, "OK")

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        start = time.perf_counter()
        parent = _parent_context(context)
        if sample is not None and telemetry.exporting():
            parent = await telemetry.picked_parent(
                parent, lambda: sample(self, request, dict(context.invocation_metadata() or ())), method)
        with _tracer.start_as_current_span(
            method, context=parent, kind=SpanKind.SERVER,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                result = await fn(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await drain_upload(request)
                await _abort(context, span, method, exc)
            finally:
                latency.observe(time.perf_counter() - start)
            ok.inc()
            return result
    return wrapper


def error_from_rpc(exc: grpc.aio.AioRpcError, where: str = "") -> CneiError:
    """Turn a failed outbound call into a CneiError carrying the same code and message."""
    code = CODE_FROM_GRPC.get(exc.code(), ErrorCode.UNAVAILABLE)
    prefix = f"{where}: " if where and code in (ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL,
                                                ErrorCode.PERMISSION_DENIED) else ""
    return error_for(code, f"{prefix}{exc.details()}")


def _with_trace(details: grpc.aio.ClientCallDetails,
                headers: tuple[tuple[str, str], ...] = ()) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in headers:
        metadata.add(key, value)
    for key, value in telemetry.inject().items():
        metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


def _method_name(details) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class _Outgoing:
    """What every outgoing call carries: `headers` (a server's restricted APIs) and the W3C
    `traceparent` of the current span."""

    def __init__(self, headers: tuple[tuple[str, str], ...] = ()):
        self.headers = headers

    def details(self, client_call_details) -> grpc.aio.ClientCallDetails:
        return _with_trace(client_call_details, self.headers)


# Calls made to check a server is there (a node probed every second) are no trace of their own
UNTRACED_METHODS = ("/grpc.health.v1.Health/",)


class _UnaryUnary(_Outgoing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        method = _method_name(client_call_details)
        if method.startswith(UNTRACED_METHODS):
            return await continuation(self.details(client_call_details), request)
        with telemetry.child_span(_tracer, method, kind=SpanKind.CLIENT):
            call = await continuation(self.details(client_call_details), request)
            await call
            return call


class _UnaryStream(_Outgoing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self.details(client_call_details), request)


class _StreamUnary(_Outgoing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        with telemetry.child_span(_tracer, _method_name(client_call_details), kind=SpanKind.CLIENT):
            call = await continuation(self.details(client_call_details), request_iterator)
            await call
            return call


class _StreamStream(_Outgoing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self.details(client_call_details), request_iterator)


def client_interceptors(headers: tuple[tuple[str, str], ...] = ()) -> list:
    """One interceptor per kind of call (grpc.aio files an interceptor under the first kind it
    implements only): a client span per unary-response call, and `traceparent` plus `headers`
    in the outgoing metadata of every call."""
    return [kind(headers) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def channel(target: str, headers: list[tuple[str, str]] | tuple = (),
            credentials: grpc.ChannelCredentials | None = None, server_name: str = "") -> grpc.aio.Channel:
    """An aio channel with trace propagation and generous message limits; `headers` (lower-case
    keys) go with every call, for a server whose APIs are restricted; `credentials`: TLS
    (services.common.tls), else plaintext; `server_name`: the name the server's certificate must
    hold ("": the target's host)."""
    interceptors = client_interceptors(tuple(headers))
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS + server_name_options(server_name),
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)


class Channels:
    """One channel per address, all with the same headers and TLS: a client of many servers of
    one kind (the runtimes), or of one server for good (a service's registry). When the TLS files
    change (a renewed client certificate or CA), later calls get new channels and the old ones
    close once their calls are done (at most `grace_s`)."""

    def __init__(self, headers: list[tuple[str, str]] | tuple = (), tls: ClientTls | None = None,
                 grace_s: float = 30.0, credentials: grpc.ChannelCredentials | None = None):
        """`tls`: the files, renewed; `credentials`: fixed ones instead (a command's, read once);
        neither: plaintext."""
        self.headers = tuple(headers)
        self._credentials = tls.renewed_grpc_credentials() if tls else None
        self._fixed = credentials
        self._server_name = tls.server_name if tls else ""
        self._generation = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: set[asyncio.Task] = set()
        self.grace_s = grace_s

    def get(self, address: str) -> grpc.aio.Channel:
        credentials = self._fixed
        if self._credentials is not None:
            credentials = self._credentials.get()
            if self._credentials.generation != self._generation:
                self._generation = self._credentials.generation
                old, self._channels = list(self._channels.values()), {}
                self._retire(old)
        found = self._channels.get(address)
        if found is None:
            found = self._channels[address] = channel(address, self.headers, credentials, self._server_name)
        return found

    def drop(self, address: str) -> None:
        """Close the channel to `address` (a server that left): calls still open on it get
        `grace_s` to finish; a later `get` opens a new one."""
        found = self._channels.pop(address, None)
        if found is not None:
            self._retire([found])

    def _retire(self, channels: list[grpc.aio.Channel]) -> None:
        """Close `channels` in the background once their calls are done (at most `grace_s`)."""
        task = asyncio.get_running_loop().create_task(self._close(channels, self.grace_s))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    @staticmethod
    async def _close(channels: list[grpc.aio.Channel], grace_s: float | None) -> None:
        await asyncio.gather(*(c.close(grace_s) for c in channels), return_exceptions=True)

    async def close(self) -> None:
        """Every channel, at once (calls still open are cancelled)."""
        for task in list(self._retired):
            task.cancel()
        await self._close(list(self._channels.values()), None)
        self._channels.clear()
