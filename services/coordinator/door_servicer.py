"""gRPC adapter of cnei.frontdoor.v1.FrontDoorControl, with its conversions: the compiled front
door asks for routes and reports what it served (see protos/cnei/frontdoor.proto)."""
from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from services.common import classification, codec, oip
from services.common.errors import InvalidArgument
from services.common.grpc_util import rpc
from services.coordinator.door import DoorRoutes, Refusal, Route
from services.coordinator.door_reports import BatchReport, RouteReport
from services.coordinator.forwarder import call_parameters
from services.pb.cnei import frontdoor_pb2 as fd
from services.pb.cnei import frontdoor_pb2_grpc as fd_grpc
from services.pb.inference import grpc_service_pb2 as pb


def ask_from_proto(message: fd.RouteRequest) -> oip.InferRequest:
    """The door's request without tensor contents -> an InferRequest with zero-filled inputs of
    the same shapes and datatypes (what placement and input checks look at)."""
    try:
        request = pb.ModelInferRequest.FromString(message.infer_request)
    except DecodeError as exc:
        raise InvalidArgument(f"route request is not a ModelInferRequest: {exc}") from None
    inputs = {}
    for tensor in request.inputs:
        dtype = codec.datatype(tensor.datatype, tensor.name).dtype
        try:
            inputs[tensor.name] = np.zeros(list(tensor.shape), dtype)
        except (ValueError, MemoryError) as exc:
            raise InvalidArgument(f"input '{tensor.name}' has shape {list(tensor.shape)}: {exc}") from None
    # outputs naming a classification (checked on the full path, which answers them) are marked
    classes = {o.name: 1 for o in request.outputs if classification.PARAMETER in o.parameters}
    return oip.InferRequest(model_name=request.model_name, model_version=request.model_version,
                            inputs=inputs, parameters=oip.params_from_proto(request.parameters),
                            outputs=[o.name for o in request.outputs], classes=classes)


POLICIES = {"edgeai": fd.RouteReply.POLICY_EDGEAI, "round_robin": fd.RouteReply.POLICY_ROUND_ROBIN,
            "random": fd.RouteReply.POLICY_RANDOM, "least_loaded": fd.RouteReply.POLICY_LEAST_LOADED}


def route_to_proto(decision: Route | Refusal) -> fd.RouteReply:
    if isinstance(decision, Refusal):
        return fd.RouteReply(eligible=False, reason=decision.reason)
    v, node, resp = decision.placement.variant, decision.placement.node, decision.response
    template = pb.ModelInferRequest(model_name=v.name, model_version=v.version)
    oip.params_to_proto(call_parameters(v), template.parameters)
    answer = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version)
    oip.params_to_proto(resp.parameters, answer.parameters)
    return fd.RouteReply(
        eligible=True, route_id=decision.route_id, node_id=node.node_id, fast_address=node.fast_address,
        request_template=template.SerializeToString(), response_template=answer.SerializeToString(),
        max_batch_size=decision.batching.max_batch_size, timeout_ms=decision.timeout_ms,
        max_inflight_batches=decision.batching.max_inflight_batches,
        max_queue_size=decision.batching.max_queue_size,
        max_queue_delay_us=decision.batching.max_queue_delay_us,
        preferred_batch_sizes=decision.batching.preferred_batch_sizes,
        alternatives=[route_to_proto(r) for r in decision.alternatives], row_ms=decision.row_ms,
        response_cache=decision.response_cache, share=decision.share,
        split_group=decision.group, policy=POLICIES[decision.policy],
        node_inflight=node.inflight, node_cpus=node.cpus, node_cpu_load=node.cpu_load)


def reports_from_proto(message: fd.FrontDoorReport) -> list[RouteReport]:
    return [RouteReport(r.route_id, list(r.request_ns), list(r.request_rows),
                        [BatchReport(b.rows, b.requests, b.duration_ns, b.compute_ns) for b in r.batches],
                        r.handed_over, r.failure, list(r.queue_ns), list(r.cache_hit_request_ns),
                        list(r.cache_hit_rows), r.cache_hit_ns, r.cache_misses, r.cache_miss_ns,
                        list(r.failed_request_ns), list(r.failed_code), list(r.failed_dropped))
            for r in message.routes]


def node_rows_from_proto(message: fd.FrontDoorReport) -> dict[str, tuple[int, int]]:
    """Each node's rows outstanding at the door, and the rows given back for it (node_rows)."""
    return {n.node_id: (n.rows, n.given_back) for n in message.node_rows}


async def _untraced(self, request, metadata) -> bool:
    """The door's asks and reports start no trace of their own (a report every few ms would
    bury the request traces); one that comes with a trace context is traced in it."""
    return False


class FrontDoorServicer(fd_grpc.FrontDoorControlServicer):
    def __init__(self, routes: DoorRoutes):
        self.routes = routes

    @rpc(sample=_untraced)
    async def Route(self, request, context):
        ask = ask_from_proto(request)
        reply = route_to_proto(await self.routes.route(ask))
        reply.ttl_ms = self.routes.ttl_ms
        reply.full_path_every = await self.routes.trace_every(ask.model_name)
        return reply

    @rpc(sample=_untraced)
    async def Report(self, request, context):
        unknown = self.routes.apply(reports_from_proto(request))
        self.routes.node_rows(node_rows_from_proto(request))
        self.routes.applied(request.generation)
        return fd.ReportReply(unknown_routes=unknown)
