"""REST inference is traced as gRPC's: one trace under the caller's W3C `traceparent` (a server
span, then the coordinator's placement, queue and batch spans and the fast-lane call, all
children of it), nothing recorded under an unsampled one, and for requests without one, Triton's
trace settings decide (`trace_rate`, `trace_level` OFF), changed over REST. A real coordinator
(tests/coordinator/mesh.py, nodes on the fast lane) behind a real aiohttp server; spans are
recorded in memory, as they would be exported."""
from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace

from services.common import telemetry
from services.common.trace_settings import MemoryTraceStore, TraceSettings
from services.coordinator.rest import build_app
from tests.coordinator.mesh import NodeCore, mesh, variant

INFER = "/v2/models/m/infer"
GOOD = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
TRACE_ID, CALLER_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
SERVER_SPAN = "POST /v2/models/{model}/infer"


@pytest.fixture
async def rest():
    """A coordinator over one stand-in node on the fast lane, its REST on a real server."""
    async with mesh([variant()], {}, {"n1": NodeCore()}, fast_lane=True) as m:
        async with TestClient(TestServer(build_app(m.core, tracing=TraceSettings(MemoryTraceStore())))) as client:
            yield client


async def post(client: TestClient, traceparent: str | None = None) -> None:
    headers = {"traceparent": traceparent} if traceparent else {}
    assert (await client.post(INFER, json=GOOD, headers=headers)).status == 200


def traces(exported: InMemorySpanExporter) -> list[str]:
    """The traces started here: their root spans' names."""
    return [s.name for s in exported.get_finished_spans() if s.parent is None]


async def test_a_sampled_traceparent_makes_one_trace_under_the_caller_s_trace_id_with_a_server_span(rest, spans):
    await post(rest, f"00-{TRACE_ID}-{CALLER_SPAN}-01")
    finished = spans.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in finished} == {TRACE_ID}
    by_name = {s.name: s for s in finished}
    server = by_name[SERVER_SPAN]
    assert server.kind is trace.SpanKind.SERVER and format(server.parent.span_id, "016x") == CALLER_SPAN
    assert server.attributes["http.response.status_code"] == 200
    ids = {s.context.span_id for s in finished}
    for name in ("coordinator.placement", "coordinator.queue", "coordinator.batch", "fastlane/ModelInfer"):
        assert by_name[name].parent.span_id in ids, f"{name} is no child of this request's spans"
    assert by_name["coordinator.placement"].parent.span_id == server.context.span_id


async def test_an_unsampled_traceparent_records_nothing(rest, spans):
    await post(rest, f"00-{TRACE_ID}-{CALLER_SPAN}-00")
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize(("settings", "traced"), [
    ({}, 6), ({"trace_rate": "3"}, 2), ({"trace_level": ["OFF"]}, 0), ({"trace_count": "4"}, 4),
], ids=["default-every-request", "rate-3", "level-off", "count-4"])
async def test_without_a_traceparent_the_trace_settings_decide_which_requests_start_a_trace(
        rest, spans, settings, traced):
    if settings:
        assert (await rest.post("/v2/trace/setting", json=settings)).status == 200
    for _ in range(6):
        await post(rest)
    assert traces(spans) == [SERVER_SPAN] * traced


async def test_calls_other_than_inference_start_no_trace_of_their_own(rest, spans):
    for path in ("/v2/health/ready", "/v2/models/m", "/v2/no/such/path"):
        await rest.get(path)
    assert spans.get_finished_spans() == ()
