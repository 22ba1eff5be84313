"""Async client of the registry's gRPC API, speaking domain types."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common import delta, deployment, grpc_util, restricted, tls
from services.common.deployment import DeploymentSpec
from services.common.errors import CneiError, ErrorCode, FailedPrecondition, InvalidArgument
from services.common.model_spec import ModelVariant, Tombstone
from services.common.registry_convert import tombstone_from_proto, variant_from_proto
from services.common.tls import ClientTls
from services.pb.cnei import registry_pb2 as rpb
from services.pb.cnei import registry_pb2_grpc as rpb_grpc

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20
NO_DEPLOYMENT = -1.0  # put_deployment's if_updated_at for a change read as no deployment at all
FETCH_TIMEOUT_S = 120.0  # an artifact's download; a channel left for renewed TLS files gets as long to finish


@dataclass(frozen=True)
class Pulled:
    """An artifact's bytes, the bytes that crossed the wire for them, and the artifact a delta
    was decoded against ("": sent whole)."""

    data: bytes
    wire_bytes: int
    base: str


def from_settings(prefix: str, settings: Any, timeout: float) -> RegistryClient:
    """A service's registry client from its settings (`registry_target`, `registry_headers`, the
    `registry_tls_*` files, renewed as they change); ValueError naming a TLS variable that is wrong
    (`tls.check_client`)."""
    return RegistryClient(settings.registry_target, timeout, restricted.headers(settings.registry_headers),
                          tls=tls.registry_tls(prefix, settings))


def _apply_delta(base_file: Path, made: bytes, sha256: str) -> bytes:
    data = delta.decode(base_file.read_bytes(), made)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise delta.DeltaError("the delta decodes to other bytes than the artifact's")
    return data


class RegistryClient:
    """Resolve, list, push and fetch model variants; failures raise CneiError subclasses."""

    def __init__(self, target: str, timeout: float = 10.0, headers: list[tuple[str, str]] | tuple = (),
                 credentials: grpc.ChannelCredentials | None = None, tls: ClientTls | None = None):
        """`headers`: sent with every call (a registry with restricted APIs); TLS to a registry
        serving it: `tls`, files whose renewals later calls take (a service's), or `credentials`
        read once (a command's); neither: plaintext."""
        self.target = target
        self.timeout = timeout
        self._channels = grpc_util.Channels(headers, tls, FETCH_TIMEOUT_S, credentials)
        self._stub_of: tuple[grpc.aio.Channel | None, rpb_grpc.ModelRegistryStub | None] = (None, None)

    @property
    def _stub(self) -> rpb_grpc.ModelRegistryStub:
        """The stub on the channel of the TLS files as they are now (a new one once they are renewed)."""
        channel = self._channels.get(self.target)
        if self._stub_of[0] is not channel:
            self._stub_of = (channel, rpb_grpc.ModelRegistryStub(channel))
        return self._stub_of[1]

    async def close(self) -> None:
        await self._channels.close()

    async def _call(self, method, request, timeout: float | None = None):
        try:
            return await method(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc, f"registry {self.target}") from None

    async def resolve(self, name: str, version: str = "", precision: str = "") -> ModelVariant:
        ref = rpb.ModelRef(name=name, version=version, precision=precision)
        return variant_from_proto(await self._call(self._stub.ResolveModel, ref))

    async def delete(self, name: str, version: str, precision: str = "") -> tuple[list[ModelVariant], int]:
        """Delete a version (one precision of it, when given): the variants deleted, the bytes freed."""
        reply = await self._call(self._stub.DeleteModel, rpb.ModelRef(name=name, version=version, precision=precision))
        return [variant_from_proto(m) for m in reply.deleted], reply.freed_bytes

    async def deleted(self, name: str = "", since: float = 0.0) -> list[Tombstone]:
        """The tombstones of the variants deleted (of model `name`, else all) at or after `since`
        (the registry's clock) that the registry still keeps, oldest first."""
        reply = await self._call(self._stub.ListDeleted, rpb.ListDeletedRequest(model=name, since=since))
        return [tombstone_from_proto(t) for t in reply.deleted]

    async def list(self, name: str = "") -> list[ModelVariant]:
        reply = await self._call(self._stub.ListModels, rpb.ListModelsRequest(name=name))
        return [variant_from_proto(m) for m in reply.models]

    async def push_file(
        self, path: str | Path, name: str, version: str, precision: str = "FP32",
        metadata: dict[str, str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ModelVariant:
        path = Path(path)
        try:  # opened before the call: an unreadable path is refused here, not mid-stream
            fh = path.open("rb")
        except OSError as exc:
            raise InvalidArgument(f"cannot read model file {str(path)!r}: {exc.strerror or exc}") from None
        total = os.fstat(fh.fileno()).st_size

        async def chunks() -> AsyncIterator[rpb.PushModelChunk]:
            header = rpb.PushModelHeader(
                name=name, version=version, precision=precision, format="onnx",
                metadata=metadata or {},
            )
            yield rpb.PushModelChunk(header=header)
            sent = 0
            while data := fh.read(CHUNK_BYTES):
                sent += len(data)
                if progress:
                    progress(sent, total)
                yield rpb.PushModelChunk(data=data)

        with fh:
            reply = await self._call(self._stub.PushModel, chunks(), timeout=max(60.0, self.timeout))
        return variant_from_proto(reply)

    async def fetch_artifact(self, sha256: str, timeout: float = FETCH_TIMEOUT_S) -> bytes:
        """Download an artifact and verify its sha256."""
        return (await self.pull_artifact(sha256, timeout=timeout)).data

    async def pull_artifact(self, sha256: str, held: Mapping[str, Path] | None = None,
                            timeout: float = FETCH_TIMEOUT_S) -> Pulled:
        """Download an artifact and verify its sha256; `held`: artifacts this side holds (sha256
        -> file, the likeliest bases first: the first delta.MAX_BASES are offered), against one of
        which the registry may send a delta. A delta the registry cannot make, or that does not
        decode or decodes to other bytes, is logged and the artifact fetched whole."""
        have = list(held or ())[:delta.MAX_BASES]
        try:
            encoding, base, data = await self._fetch(sha256, have, timeout)
        except CneiError as exc:
            if not have or exc.code in (ErrorCode.NOT_FOUND, ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED):
                raise
            log.warning("registry could not send artifact %s against what this side holds (%s): fetching it whole",
                        sha256[:12], exc)
            encoding, base, data = await self._fetch(sha256, [], timeout)
        wire = len(data)
        if encoding == "delta":
            try:
                base_file = (held or {}).get(base)
                if base_file is None:
                    raise delta.DeltaError(f"the registry sent a delta against {base}, which this side did not offer")
                data = await asyncio.to_thread(_apply_delta, base_file, data, sha256)
            except (delta.DeltaError, OSError) as exc:
                log.warning("delta for artifact %s unusable (%s): fetching it whole", sha256[:12], exc)
                _, _, data = await self._fetch(sha256, [], timeout)
                return Pulled(data, wire + len(data), "")
        elif encoding:
            raise FailedPrecondition(f"registry {self.target} sent artifact {sha256} in unknown encoding {encoding!r}")
        return Pulled(data, wire, base if encoding else "")

    async def _fetch(self, sha256: str, have: list[str], timeout: float) -> tuple[str, str, bytes]:
        """(encoding, base, bytes) as the registry sent them; the artifact itself is checked here."""
        parts, encoding, base = [], "", ""
        try:
            call = self._stub.FetchArtifact(rpb.FetchArtifactRequest(sha256=sha256, have=have), timeout=timeout)
            async for chunk in call:
                if not parts:
                    encoding, base = chunk.encoding, chunk.base_sha256
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise grpc_util.error_from_rpc(exc, f"registry {self.target}") from None
        data = b"".join(parts)
        if not encoding:
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                raise FailedPrecondition(f"artifact from registry hashes to {digest}, expected {sha256}")
        return encoding, base, data

    async def record_measurement(self, variant: ModelVariant, node_class: str, node_id: str,
                                 latency_ms: float, memory_bytes: int) -> ModelVariant:
        request = rpb.Measurement(
            model=rpb.ModelRef(name=variant.name, version=variant.version, precision=variant.precision),
            node_class=node_class, node_id=node_id, latency_ms=latency_ms, memory_bytes=memory_bytes)
        return variant_from_proto(await self._call(self._stub.RecordMeasurement, request))

    async def put_deployment(self, spec: DeploymentSpec, if_updated_at: float = 0.0) -> DeploymentSpec:
        """Apply `spec`; with `if_updated_at` (read_deployment's, or NO_DEPLOYMENT) only over the
        deployment read then: FailedPrecondition when another was stored meanwhile."""
        request = rpb.Deployment(spec_json=deployment.to_json(spec), updated_at=if_updated_at)
        reply = await self._call(self._stub.PutDeployment, request)
        return deployment.from_json(reply.spec_json)

    async def get_deployment(self, model: str) -> DeploymentSpec:
        return (await self.read_deployment(model))[0]

    async def read_deployment(self, model: str) -> tuple[DeploymentSpec, float]:
        """The model's deployment and its updated_at (what put_deployment's `if_updated_at` takes)."""
        reply = await self._call(self._stub.GetDeployment, rpb.GetDeploymentRequest(model=model))
        return deployment.from_json(reply.spec_json), reply.updated_at

    async def delete_deployment(self, model: str, if_updated_at: float = 0.0) -> str:
        """Delete the model's deployment (with `if_updated_at`, read_deployment's, only the one read
        then: FailedPrecondition when another was put meanwhile); the JSON of the one deleted."""
        request = rpb.DeleteDeploymentRequest(model=model, if_updated_at=if_updated_at)
        return (await self._call(self._stub.DeleteDeployment, request)).spec_json

    async def list_deployments(self) -> list[DeploymentSpec]:
        reply = await self._call(self._stub.ListDeployments, rpb.ListDeploymentsRequest())
        return [deployment.from_json(d.spec_json) for d in reply.deployments]
