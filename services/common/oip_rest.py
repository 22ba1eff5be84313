"""OIP REST v2 (KServe v2 JSON) adapter over the shared OIP operations, on aiohttp: the
coordinator's and every runtime's (each passes its own core, settings and extra routes)."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from services.common import oip_json
from services.common.errors import HTTP_STATUS, Cancelled, CneiError, InvalidArgument, outcome_of
from services.common.oip_convert import model_config, platform, stats_to_proto
from services.common.oip_operations import (EXTENSIONS, InferenceCore, classified, failure_counted,
                                            inference_metrics, refuse_load_overrides, repository_models,
                                            statistics, trace_setting)
from services.common.log_settings import LogSettings
from services.common.rest_tracing import tracing_middleware
from services.common.restricted import Key, refusal, rest_categories
from services.common.shm import SharedMemoryRegions, cuda_status, refuse_cuda
from services.common.trace_settings import MemoryTraceStore, TraceSettings
from services.pb.inference import grpc_service_pb2 as pb

log = logging.getLogger(__name__)
OFF_LOOP_BYTES = 1 << 20  # infer bodies larger than this are decoded in a worker thread


def _error(exc: CneiError) -> web.Response:
    return web.json_response({"error": exc.message}, status=HTTP_STATUS[exc.code])


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no such path 404, wrong method 405, body too large 413) as
    Triton's {"error": ...} JSON; the headers they carry (Allow) kept."""
    default = f"{exc.status}: {exc.reason}"
    detail = exc.text if exc.text and exc.text != default else f"{request.method} {request.path}"
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    return web.json_response({"error": f"{exc.reason}: {detail}"}, status=exc.status, headers=headers)


def _unreadable(request: web.Request, exc: RequestPayloadError) -> web.Response:
    """A request body that cannot be read (aiohttp's HttpProcessingError says why, with its code):
    the client's error; the rest of the body is not read (aiohttp would fail on it again) and the
    connection closes after the reply."""
    cause = exc.__cause__
    message, status = (cause.message, cause.code or 400) if isinstance(cause, HttpProcessingError) else (str(exc), 400)
    request.content.feed_eof()
    reply = web.json_response({"error": f"request body cannot be read: {message}"}, status=status)
    reply.force_close()
    return reply


def _refusal_status(exc: BaseException) -> int | None:
    """The HTTP status aiohttp's own refusal of a request answers with (what errors_middleware
    replies); None for any other error."""
    if isinstance(exc, RequestPayloadError):
        cause = exc.__cause__
        return (cause.code or 400) if isinstance(cause, HttpProcessingError) else 400
    return exc.status if isinstance(exc, web.HTTPException) else None


def _outcome(exc: BaseException) -> str:
    """An inference's metrics outcome over REST: aiohttp's refusals are the client's errors, as
    their replies say (413, a body too large: resource_exhausted; a body that cannot be read,
    corrupt gzip or an unknown Content-Encoding, and other 4xx: invalid_argument); any other
    error as over gRPC (errors.outcome_of)."""
    status = _refusal_status(exc)
    if status is None:
        return outcome_of(exc)
    return "resource_exhausted" if status == 413 else "invalid_argument" if status < 500 else "internal"


async def _read_body(request: web.Request) -> bytes:
    """An infer request's body; a client that hangs up while sending it cancelled its request."""
    try:
        return await request.read()
    except ConnectionResetError:
        raise Cancelled("the client closed its connection before its request body was read") from None


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except CneiError as exc:
        return _error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(request, exc)
    except RequestPayloadError as exc:  # a body aiohttp cannot read (corrupt gzip/deflate): the client's
        return _unreadable(request, exc)
    except Exception as exc:  # noqa: BLE001 - answered as 500 and logged once
        log.exception("unhandled error on %s", request.path)
        return web.json_response({"error": f"internal error: {exc}"}, status=500)


def _tensors(specs) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def _json_body(raw: bytes, what: str) -> object:
    try:
        return json.loads(raw) if raw else {}
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise InvalidArgument(f"{what} is not JSON: {exc}") from None


def _decode_infer(name: str, version: str, raw: bytes, length: int | None,
                  shm: SharedMemoryRegions) -> oip_json.JsonInfer:
    """An infer body: JSON, or a JSON header of `length` bytes and the binary tensor data after it."""
    header, binary = (raw, b"") if length is None else (raw[:length], memoryview(raw)[length:])
    return oip_json.infer_from_json(name, version, _json_body(header, "request body"), binary, shm)


def _header_length(request: web.Request, size: int) -> int | None:
    text = request.headers.get(oip_json.HEADER_LENGTH)
    if text is None:
        return None
    try:
        length = int(text)
    except ValueError:
        length = -1
    if not 0 <= length <= size:
        raise InvalidArgument(f"{oip_json.HEADER_LENGTH} must be an integer from 0 to the body's "
                              f"{size} bytes, not '{text}'")
    return length


def _trace_changes(body: object) -> dict[str, list[str] | None]:
    """Triton's trace setting body: {name: value, [values] or null (clear)}."""
    if not isinstance(body, dict):
        raise InvalidArgument("trace setting body must be a JSON object of setting names to values")
    def text(value):
        if isinstance(value, (dict, list)):
            raise InvalidArgument(f"trace setting values are strings or numbers, not {json.dumps(value)}")
        return str(value).lower() if isinstance(value, bool) else str(value)
    return {name: None if value is None else [text(v) for v in value] if isinstance(value, list) else [text(value)]
            for name, value in body.items()}


def build_app(core: InferenceCore, extra_routes: list[web.RouteDef] | None = None,
              shm: SharedMemoryRegions | None = None, tracing: TraceSettings | None = None,
              logs: LogSettings | None = None, restricted: Mapping[str, Key] | None = None) -> web.Application:
    """Triton's HTTP/REST API over the core: KServe v2 JSON plus the binary tensor data,
    model configuration, statistics, repository index and system shared memory extensions."""
    routes = web.RouteTableDef()
    shm = shm if shm is not None else SharedMemoryRegions()
    tracing = tracing if tracing is not None else TraceSettings(MemoryTraceStore())
    logs = logs if logs is not None else LogSettings()

    @routes.get("/v2/health/live")
    async def live(request):
        return web.json_response({"live": True})

    @routes.get("/v2/health/ready")
    async def ready(request):
        ok = await core.ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    @routes.get("/v2")
    async def server_metadata(request):
        return web.json_response({"name": core.server_name, "version": core.server_version,
                                  "extensions": EXTENSIONS})

    async def model_metadata(request):
        name, version = request.match_info["model"], request.match_info.get("version", "")
        variant = await core.model_variant(name, version)
        return web.json_response({
            "name": variant.name, "versions": await core.model_versions(name), "platform": platform(variant),
            "inputs": _tensors(variant.inputs), "outputs": _tensors(variant.outputs),
        })

    async def model_ready(request):
        ok = await core.model_ready(request.match_info["model"], request.match_info.get("version", ""))
        return web.json_response({"name": request.match_info["model"], "ready": ok},
                                 status=200 if ok else 503)

    async def infer(request):
        name, version = request.match_info["model"], request.match_info.get("version", "")
        with inference_metrics(core, name, _outcome):
            with failure_counted(core, name, version):
                raw = await _read_body(request)
                length = _header_length(request, len(raw))
                if len(raw) > OFF_LOOP_BYTES:  # parsing megabytes of JSON would stall every other request
                    decoded = await asyncio.to_thread(_decode_infer, name, version, raw, length, shm)
                else:
                    decoded = _decode_infer(name, version, raw, length, shm)
            response = await classified(core, decoded.request, await core.infer(decoded.request))
            body = oip_json.response_to_json(response, decoded, shm)
            if isinstance(body, dict):
                reply = web.json_response(body, dumps=oip_json.dumps)
            else:
                data, header_length = body
                reply = web.Response(body=data, content_type="application/octet-stream",
                                     headers={oip_json.HEADER_LENGTH: str(header_length)})
            # request bodies in gzip/deflate are inflated by aiohttp; replies are compressed when
            # the client accepts it (tritonclient's response_compression_algorithm)
            if any(c in request.headers.get("Accept-Encoding", "") for c in ("gzip", "deflate")):
                reply.enable_compression()
            return reply

    async def model_config_json(request):
        config = await model_config(core, request.match_info["model"], request.match_info.get("version", ""))
        return web.json_response(oip_json.proto_to_json(config.config))

    async def model_stats(request):
        stats = await statistics(core, request.match_info.get("model", ""), request.match_info.get("version", ""))
        reply = pb.ModelStatisticsResponse(model_stats=[stats_to_proto(s) for s in stats])
        return web.json_response(oip_json.proto_to_json(reply))

    routes.get("/v2/models/stats")(model_stats)  # before /v2/models/{model}, which would take it
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes.get(prefix)(model_metadata)
        routes.get(prefix + "/ready")(model_ready)
        routes.post(prefix + "/infer")(infer)
        routes.get(prefix + "/config")(model_config_json)
        routes.get(prefix + "/stats")(model_stats)

    @routes.post("/v2/repository/index")
    async def repository_index(request):
        body = _json_body(await request.read(), "index body")
        ready = body.get("ready", False) if isinstance(body, dict) else False
        if not isinstance(ready, bool):
            raise InvalidArgument(f"index body: 'ready' must be true or false, not {json.dumps(ready)}")
        return web.json_response([{"name": e.name, "version": e.version, "state": e.state,
                                   **({"reason": e.reason} if e.reason else {})}
                                  for e in await repository_models(core, ready)])

    @routes.post("/v2/repository/models/{model}/load")
    async def repository_load(request):
        body = _json_body(await request.read(), "load body")
        parameters = body.get("parameters") if isinstance(body, dict) else None
        if not isinstance(parameters, dict | None):
            raise InvalidArgument("load body: 'parameters' must be a JSON object")
        refuse_load_overrides(request.match_info["model"], parameters or {})
        await core.load_model(request.match_info["model"])
        return web.json_response({})

    @routes.post("/v2/repository/models/{model}/unload")
    async def repository_unload(request):
        await core.unload_model(request.match_info["model"])
        return web.json_response({})

    # --- system shared memory (and CUDA shared memory, which is not offered) ------------------
    async def shm_status(request):
        return web.json_response([{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                                  for r in shm.status(request.match_info.get("region", ""))])

    @routes.post("/v2/systemsharedmemory/region/{region}/register")
    async def shm_register(request):
        body = _json_body(await request.read(), "register body")
        if not isinstance(body, dict) or not isinstance(body.get("key"), str):
            raise InvalidArgument("register body must be a JSON object with 'key', 'offset' and 'byte_size'")
        numbers = [body.get("offset", 0), body.get("byte_size")]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise InvalidArgument("'offset' and 'byte_size' must be non-negative integers")
        shm.register(request.match_info["region"], body["key"], *numbers)
        return web.json_response({})

    async def shm_unregister(request):
        shm.unregister(request.match_info.get("region", ""))
        return web.json_response({})

    for prefix in ("/v2/systemsharedmemory", "/v2/systemsharedmemory/region/{region}"):
        routes.get(prefix + "/status")(shm_status)
        routes.post(prefix + "/unregister")(shm_unregister)

    async def cuda_regions(request):
        return web.json_response(cuda_status(request.match_info.get("region", "")))

    @routes.post("/v2/cudasharedmemory/region/{region}/register")
    async def cuda_register(request):
        refuse_cuda(request.match_info["region"])

    async def cuda_unregister(request):
        return web.json_response({})

    for prefix in ("/v2/cudasharedmemory", "/v2/cudasharedmemory/region/{region}"):
        routes.get(prefix + "/status")(cuda_regions)
        routes.post(prefix + "/unregister")(cuda_unregister)

    # --- trace extension -----------------------------------------------------------------------
    async def trace_get(request):
        return web.json_response(await trace_setting(core, tracing, request.match_info.get("model", ""), None))

    async def trace_update(request):
        changes = _trace_changes(_json_body(await request.read(), "trace setting body"))
        model = request.match_info.get("model", "")
        if model and not changes:  # Triton: a model's update with no settings removes its own
            changes = dict.fromkeys(("trace_level", "trace_rate", "trace_count"))
        return web.json_response(await trace_setting(core, tracing, model, changes))

    for path in ("/v2/trace/setting", "/v2/models/{model}/trace/setting"):
        routes.get(path)(trace_get)
        routes.post(path)(trace_update)

    # --- logging extension ---------------------------------------------------------------------
    @routes.get("/v2/logging")
    async def logging_get(request):
        return web.json_response(await logs.get())

    @routes.post("/v2/logging")
    async def logging_update(request):
        body = _json_body(await request.read(), "log settings body")
        if not isinstance(body, dict):
            raise InvalidArgument("log settings body must be a JSON object of setting names to values")
        return web.json_response(await logs.update(body))

    middlewares = [tracing_middleware(tracing), errors_middleware]
    if restricted:
        @web.middleware
        async def restricted_middleware(request, handler):
            for category in rest_categories(request.path):
                if reason := refusal(restricted, category, request.headers):
                    return web.json_response({"error": reason}, status=403)
            return await handler(request)
        middlewares.append(restricted_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    app.add_routes(routes)
    if extra_routes:
        app.add_routes(extra_routes)
    return app
