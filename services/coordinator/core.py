"""Coordinator core: resolve the model, place the request on a live node, forward, fail over."""
from __future__ import annotations

import logging
import time

import grpc
from opentelemetry import trace

from services.common import grpc_util, oip
from services.common.errors import CneiError, ErrorCode, NoLiveNode
from services.common.model_spec import ModelVariant, check_inputs, version_key
from services.common.registry_client import RegistryClient
from services.common.stats import ModelStats, StatsBook
from services.coordinator.nodes_view import NodesView
from services.coordinator.placement import least_outstanding
from services.coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


class Coordinator:
    server_name = "cnei-coordinator"
    server_version = "0.1.0"

    def __init__(self, settings: CoordinatorSettings, registry: RegistryClient, nodes: NodesView):
        self.settings = settings
        self.registry = registry
        self.nodes = nodes
        self.stats = StatsBook()
        self.outstanding: dict[str, int] = {}
        self._resolved: dict[tuple[str, str, str], tuple[ModelVariant, float]] = {}

    async def resolve(self, name: str, version: str = "", precision: str = "") -> ModelVariant:
        key = (name, version, precision.upper())
        cached = self._resolved.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        variant = await self.registry.resolve(name, version, precision)
        self._resolved[key] = (variant, time.monotonic() + self.settings.resolve_ttl_s)
        return variant

    def forget_resolutions(self, name: str = "") -> None:
        self._resolved = {k: v for k, v in self._resolved.items() if name and k[0] != name}

    # --- InferenceCore ----------------------------------------------------------------------
    async def ready(self) -> bool:
        return bool(self.nodes.nodes)

    async def model_ready(self, name: str, version: str) -> bool:
        try:
            await self.resolve(name, version)
        except CneiError:
            return False
        return bool(self.nodes.nodes)

    async def model_variant(self, name: str, version: str = "") -> ModelVariant:
        return await self.resolve(name, version)

    async def model_versions(self, name: str) -> list[str]:
        return sorted({v.version for v in await self.registry.list(name)}, key=version_key)

    async def repository_index(self) -> list[ModelVariant]:
        return await self.registry.list()

    def statistics(self, name: str, version: str) -> list[ModelStats]:
        return self.stats.select(name, version)

    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None) -> oip.InferResponse:
        start = time.perf_counter_ns()
        precision = str(request.parameters.get("precision", "") or "")
        variant = await self.resolve(request.model_name, request.model_version, precision)
        stats = self.stats.get(variant.name, variant.version)
        try:
            check_inputs(variant, request.inputs)
            forwarded = oip.InferRequest(
                model_name=variant.name, model_version=variant.version, id=request.id,
                parameters={**request.parameters, "precision": variant.precision},
                inputs=request.inputs, outputs=request.outputs, raw=True,
            )
            response = await self._forward(variant, forwarded, deadline_s)
        except Exception:
            stats.record(False, time.perf_counter_ns() - start)
            raise
        batch = next(iter(request.inputs.values())).shape[0] if variant.max_batch_size else 1
        stats.record(True, time.perf_counter_ns() - start, int(batch))
        response.id = request.id
        return response

    async def _forward(self, variant: ModelVariant, request: oip.InferRequest,
                       deadline_s: float | None) -> oip.InferResponse:
        timeout = deadline_s if deadline_s is not None else self.settings.forward_timeout_s
        deadline = time.monotonic() + timeout
        message = oip.request_to_proto(request)
        tried: list[str] = []
        last_error: CneiError | None = None
        for _ in range(max(1, self.settings.max_attempts)):
            node = least_outstanding(self.nodes.nodes, variant.key, self.outstanding, tried)
            remaining = deadline - time.monotonic()
            if node is None or remaining <= 0:
                break
            tried.append(node.node_id)
            self.outstanding[node.node_id] = self.outstanding.get(node.node_id, 0) + 1
            try:
                reply = await self.nodes.stub(node).ModelInfer(message, timeout=remaining)
                return oip.response_from_proto(reply)
            except grpc.aio.AioRpcError as exc:
                last_error = grpc_util.error_from_rpc(exc, f"node {node.node_id}")
                if exc.code() not in RETRYABLE:
                    raise last_error from None
                log.warning("node %s failed for %s: %s; trying another", node.node_id, variant.key, exc.details())
            finally:
                self.outstanding[node.node_id] -= 1
        if last_error is not None:
            raise last_error
        if time.monotonic() >= deadline:
            raise CneiError(f"deadline passed before model '{variant.name}' could be placed",
                            ErrorCode.DEADLINE_EXCEEDED)
        raise NoLiveNode(variant.name)
