"""Sending a batch to one node: OIP messages over the fast lane (or gRPC), feeding the node's
measured RTT and compute time back into the nodes view."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
import numpy as np
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import grpc_util, oip, telemetry
from services.common.batcher import Send
from services.common.errors import CneiError, DeadlineExceeded, ErrorCode, PermissionDenied, Unavailable, error_for
from services.common.model_spec import FORMED_BATCH, ModelVariant
from services.common.nodes import NodeInfo
from services.coordinator.nodes_view import NodesView
from services.pb.inference import grpc_service_pb2 as pb

_tracer = trace.get_tracer(__name__)
log = logging.getLogger(__name__)
_told: set[str] = set()  # nodes whose refusal was logged
# gRPC codes CNEI has no name for that are a server's own fault, as INTERNAL is (Envoy: 500)
SERVER_FAULTS = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)


def refused_by(node: NodeInfo, exc: PermissionDenied) -> Unavailable:
    """A node that refuses the coordinator's call (its restricted APIs want a key the coordinator
    lacks) is a node this coordinator cannot use: UNAVAILABLE, so the request fails over and the
    breaker opens, rather than the client hearing of a header it never had to send."""
    if node.node_id not in _told:
        _told.add(node.node_id)
        log.warning("node %s refused the coordinator's call (%s): check CNEI_COORDINATOR_NODE_HEADERS",
                    node.node_id, exc.message)
    return Unavailable(f"node {node.node_id} refused the coordinator's call (its restricted APIs)")


async def call_grpc(nodes: NodesView, node: NodeInfo, message: pb.ModelInferRequest,
                    timeout: float) -> pb.ModelInferResponse:
    try:
        return await nodes.stub(node).ModelInfer(message, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in SERVER_FAULTS:  # not UNAVAILABLE, error_from_rpc's default: the node answered
            raise CneiError(f"node {node.node_id}: {exc.code().name}: {exc.details()}", ErrorCode.INTERNAL) from None
        raise grpc_util.error_from_rpc(exc, f"node {node.node_id}") from None


async def call_fast(nodes: NodesView, node: NodeInfo, message: pb.ModelInferRequest,
                    timeout: float) -> pb.ModelInferResponse:
    """The node's answer over its fast lane; an error names the node by id where the fast-lane
    client names its (internal) address."""
    with telemetry.child_span(_tracer, "fastlane/ModelInfer", kind=SpanKind.CLIENT):
        try:
            payload = await nodes.fast_client(node).call(message.SerializeToString(), timeout)
        except CneiError as exc:
            if node.fast_address not in exc.message:
                raise
            raise error_for(exc.code, exc.message.replace(node.fast_address, f"node {node.node_id}")) from None
    return pb.ModelInferResponse.FromString(payload)


def call_parameters(variant: ModelVariant) -> dict:
    """The parameters of every call to a node (the coordinator's batches and its front door's):
    the variant's precision, and that the call is a batch the deployment formed (FORMED_BATCH)."""
    return {"precision": variant.precision, FORMED_BATCH: True}


def sender(nodes: NodesView, node: NodeInfo, variant: ModelVariant, fast_lane: bool,
           on_run: Callable[[int, int], None] | None = None) -> Send:
    """The batcher's `send` for one (variant, node); `on_run(rows, compute_ns)` hears of every
    batch the node ran (its compute time as the node reports it)."""
    call = call_fast if node.fast_address and fast_lane else call_grpc

    async def send(inputs: dict[str, np.ndarray], size: int, deadline: float) -> dict[str, np.ndarray]:
        message = oip.request_to_proto(oip.InferRequest(
            model_name=variant.name, model_version=variant.version, inputs=inputs,
            parameters=call_parameters(variant)))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before model '{variant.name}' was sent")
        start = time.perf_counter()
        trace.get_current_span().set_attributes({
            "cnei.version": variant.version, "cnei.precision": variant.precision,
            "cnei.node": node.node_id, "cnei.tier": node.tier})
        try:
            reply = await call(nodes, node, message, remaining)
        except PermissionDenied as exc:
            raise refused_by(node, exc) from None
        response = oip.response_from_proto(reply)
        compute_us = float(response.parameters.get("cnei_compute_us", 0) or 0)
        nodes.observe_rtt(node.node_id, (time.perf_counter() - start) * 1e3 - compute_us / 1e3)
        if compute_us:
            nodes.observe_compute(node.node_id, compute_us / 1e3 / max(1, size))
        if on_run is not None:
            on_run(size, int(compute_us * 1000))
        return response.outputs

    return send
