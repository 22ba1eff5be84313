"""The coordinator's REST: the shared OIP REST v2 adapter (services.common.oip_rest) plus its
status page."""
from __future__ import annotations

from pathlib import Path

from aiohttp import web

from services.common.oip_rest import build_app
from services.coordinator.status import build_status

__all__ = ["build_app", "status_routes"]
STATUS_PAGE = Path(__file__).parent / "static" / "index.html"


def status_routes(core, jobs=None) -> list[web.RouteDef]:
    """The status page at `/` and the JSON it polls at `/api/status` (federated jobs from `jobs`,
    a services.common.jobs.JobStore, when given)."""
    async def page(request):
        return web.FileResponse(STATUS_PAGE, headers={"Cache-Control": "no-cache"})

    async def status(request):
        return web.json_response(await build_status(core, jobs), headers={"Cache-Control": "no-store"})

    return [web.get("/", page), web.get("/api/status", status)]
