"""Async client of the registry's gRPC API, speaking domain types."""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from services.common import deployment, grpc_util
from services.common.deployment import DeploymentSpec
from services.common.errors import FailedPrecondition
from services.common.model_spec import ModelVariant
from services.common.registry_convert import variant_from_proto
from services.pb.cnei import registry_pb2 as rpb
from services.pb.cnei import registry_pb2_grpc as rpb_grpc

CHUNK_BYTES = 1 << 20


class RegistryClient:
    """Resolve, list, push and fetch model variants; failures raise CneiError subclasses."""

    def __init__(self, target: str, timeout: float = 10.0, headers: list[tuple[str, str]] | tuple = ()):
        """`headers`: sent with every call (a registry with restricted APIs)."""
        self.target = target
        self.timeout = timeout
        self._channel = grpc_util.channel(target, headers)
        self._stub = rpb_grpc.ModelRegistryStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, timeout: float | None = None):
        try:
            return await method(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc, f"registry {self.target}") from None

    async def resolve(self, name: str, version: str = "", precision: str = "") -> ModelVariant:
        ref = rpb.ModelRef(name=name, version=version, precision=precision)
        return variant_from_proto(await self._call(self._stub.ResolveModel, ref))

    async def list(self, name: str = "") -> list[ModelVariant]:
        reply = await self._call(self._stub.ListModels, rpb.ListModelsRequest(name=name))
        return [variant_from_proto(m) for m in reply.models]

    async def push_file(
        self, path: str | Path, name: str, version: str, precision: str = "FP32",
        metadata: dict[str, str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ModelVariant:
        path = Path(path)
        total = path.stat().st_size

        async def chunks() -> AsyncIterator[rpb.PushModelChunk]:
            header = rpb.PushModelHeader(
                name=name, version=version, precision=precision, format="onnx",
                metadata=metadata or {},
            )
            yield rpb.PushModelChunk(header=header)
            sent = 0
            with path.open("rb") as fh:
                while data := fh.read(CHUNK_BYTES):
                    sent += len(data)
                    if progress:
                        progress(sent, total)
                    yield rpb.PushModelChunk(data=data)

        reply = await self._call(self._stub.PushModel, chunks(), timeout=max(60.0, self.timeout))
        return variant_from_proto(reply)

    async def fetch_artifact(self, sha256: str, timeout: float = 120.0) -> bytes:
        """Download an artifact and verify its sha256."""
        digest, parts = hashlib.sha256(), []
        try:
            call = self._stub.FetchArtifact(rpb.FetchArtifactRequest(sha256=sha256), timeout=timeout)
            async for chunk in call:
                digest.update(chunk.data)
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc, f"registry {self.target}") from None
        if digest.hexdigest() != sha256:
            raise FailedPrecondition(
                f"artifact from registry hashes to {digest.hexdigest()}, expected {sha256}"
            )
        return b"".join(parts)

    async def record_measurement(self, variant: ModelVariant, node_class: str, node_id: str,
                                 latency_ms: float, memory_bytes: int) -> ModelVariant:
        request = rpb.Measurement(
            model=rpb.ModelRef(name=variant.name, version=variant.version, precision=variant.precision),
            node_class=node_class, node_id=node_id, latency_ms=latency_ms, memory_bytes=memory_bytes)
        return variant_from_proto(await self._call(self._stub.RecordMeasurement, request))

    async def put_deployment(self, spec: DeploymentSpec) -> DeploymentSpec:
        reply = await self._call(self._stub.PutDeployment, rpb.Deployment(spec_json=deployment.to_json(spec)))
        return deployment.from_json(reply.spec_json)

    async def get_deployment(self, model: str) -> DeploymentSpec:
        reply = await self._call(self._stub.GetDeployment, rpb.GetDeploymentRequest(model=model))
        return deployment.from_json(reply.spec_json)

    async def list_deployments(self) -> list[DeploymentSpec]:
        reply = await self._call(self._stub.ListDeployments, rpb.ListDeploymentsRequest())
        return [deployment.from_json(d.spec_json) for d in reply.deployments]
