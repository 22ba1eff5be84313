"""OIP REST v2 (KServe v2 JSON) adapter of the coordinator core, on aiohttp."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from aiohttp import web

from services.common import oip_json
from services.common.errors import HTTP_STATUS, CneiError, InvalidArgument
from services.common.oip_servicer import EXTENSIONS, PLATFORM, InferenceCore, inference_metrics
from services.coordinator.status import build_status

log = logging.getLogger(__name__)
STATUS_PAGE = Path(__file__).parent / "static" / "index.html"


def _error(exc: CneiError) -> web.Response:
    return web.json_response({"error": exc.message}, status=HTTP_STATUS[exc.code])


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except CneiError as exc:
        return _error(exc)
    except web.HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - answered as 500 and logged once
        log.exception("unhandled error on %s", request.path)
        return web.json_response({"error": f"internal error: {exc}"}, status=500)


def _tensors(specs) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def build_app(core: InferenceCore, extra_routes: list[web.RouteDef] | None = None) -> web.Application:
    routes = web.RouteTableDef()

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
            "name": variant.name, "versions": await core.model_versions(name), "platform": PLATFORM,
            "inputs": _tensors(variant.inputs), "outputs": _tensors(variant.outputs),
        })

    async def model_ready(request):
        ok = await core.model_ready(request.match_info["model"], request.match_info.get("version", ""))
        return web.json_response({"name": request.match_info["model"], "ready": ok},
                                 status=200 if ok else 503)

    async def infer(request):
        name, version = request.match_info["model"], request.match_info.get("version", "")
        with inference_metrics(name):
            try:
                body = json.loads(await request.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidArgument(f"request body is not JSON: {exc}") from None
            response = await core.infer(oip_json.request_from_json(name, version, body))
            return web.json_response(oip_json.response_to_json(response))

    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes.get(prefix)(model_metadata)
        routes.get(prefix + "/ready")(model_ready)
        routes.post(prefix + "/infer")(infer)

    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024 * 1024)
    app.add_routes(routes)
    if extra_routes:
        app.add_routes(extra_routes)
    return app


def status_routes(core, jobs=None) -> list[web.RouteDef]:
    """The status page at `/` and the JSON it polls at `/api/status` (federated jobs from `jobs`,
    a services.common.jobs.JobStore, when given)."""
    async def page(request):
        return web.FileResponse(STATUS_PAGE, headers={"Cache-Control": "no-cache"})

    async def status(request):
        return web.json_response(await build_status(core, jobs), headers={"Cache-Control": "no-store"})

    return [web.get("/", page), web.get("/api/status", status)]
