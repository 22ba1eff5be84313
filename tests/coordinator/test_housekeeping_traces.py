"""Housekeeping calls start no traces of their own: the coordinator's health probes of its nodes
(every node, every second) and the front door's Route and Report calls would otherwise bury the
request traces in Jaeger. Requests are traced as ever, and so is a control call that comes with a
sampled trace context. Real gRPC servers; spans recorded in memory as they would be exported."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import grpc_util, lifecycle
from services.coordinator.door_servicer import FrontDoorServicer
from services.pb.cnei import frontdoor_pb2 as fd
from services.pb.cnei import frontdoor_pb2_grpc as fd_grpc
from tests.coordinator.test_door import routes

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_a_health_probe_makes_no_client_span_where_another_call_does(spans):
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    await server.start()
    try:
        async with grpc_util.channel(server.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            other = channel.unary_unary("/cnei.test.v1.Nothing/Call")
            try:
                await other(b"", timeout=5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)
    assert [s.name for s in spans.get_finished_spans()] == ["/cnei.test.v1.Nothing/Call"]


async def test_the_front_door_s_reports_and_route_asks_start_no_trace_unless_sent_one(spans):
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(fd_grpc.add_FrontDoorControlServicer_to_server, FrontDoorServicer(routes()),
               "cnei.frontdoor.v1.FrontDoorControl")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:  # as the door calls: no trace context
            stub = fd_grpc.FrontDoorControlStub(channel)
            await stub.Report(fd.FrontDoorReport(), timeout=5)
            assert spans.get_finished_spans() == ()
            await stub.Report(fd.FrontDoorReport(), timeout=5, metadata=(("traceparent", SAMPLED),))
    finally:
        await server.stop(0)
    assert [s.name for s in spans.get_finished_spans()] == ["FrontDoorServicer/Report"]
