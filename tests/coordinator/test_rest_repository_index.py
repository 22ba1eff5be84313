"""REST `POST /v2/repository/index` over a real aiohttp server: `ready` is a JSON boolean; any
other value is a 400 naming the field, never read as true (which left unloaded models out)."""
from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.coordinator.rest import build_app
from tests.coordinator.mesh import variant


class IndexCore:
    """A repository of models 'm' (loaded) and 'n' (unloaded)."""

    server_name, server_version = "test", "0"

    async def repository_index(self):
        return [variant("m"), variant("n")]

    async def unloaded_models(self) -> frozenset[str]:
        return frozenset({"n"})


async def index(body: bytes) -> tuple[int, object]:
    async with TestClient(TestServer(build_app(IndexCore()))) as client:
        reply = await client.post("/v2/repository/index", data=body)
        return reply.status, await reply.json()


@pytest.mark.parametrize(("body", "names"), [(b"", ["m", "n"]), (b"{}", ["m", "n"]), (b'{"ready": false}', ["m", "n"]),
                                             (b'{"ready": true}', ["m"])],
                         ids=["no-body", "no-field", "false", "true"])
async def test_the_index_lists_unloaded_models_unless_ready_is_true(body, names):
    status, listed = await index(body)
    assert status == 200 and [e["name"] for e in listed] == names


@pytest.mark.parametrize(("value", "shown"), [('"false"', '"false"'), ('"no"', '"no"'), ("[0]", "[0]"), ("1", "1"),
                                              ("null", "null")],
                         ids=["string-false", "string-no", "list", "number", "null"])
async def test_a_ready_that_is_not_a_json_boolean_is_a_400_naming_the_field(value, shown):
    status, reply = await index(f'{{"ready": {value}}}'.encode())
    assert (status, reply) == (400, {"error": f"index body: 'ready' must be true or false, not {shown}"})
