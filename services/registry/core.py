"""Registry core: add, list, get and resolve model variants; no transport code here."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from services.common import deployment, events
from services.common.deployment import DeploymentSpec
from services.common.errors import (ArtifactNotFound, InvalidArgument, ModelNotFound, NotFound,
                                    ResourceExhausted)
from services.common.model_spec import PRECISIONS, ModelVariant, pick_variant, version_key
from services.registry.onnx_inspect import inspect_onnx
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)
Publisher = Callable[[str, dict], Awaitable[object]]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class PushHeader:
    name: str
    version: str
    precision: str = "FP32"
    format: str = "onnx"
    metadata: dict[str, str] = field(default_factory=dict)


def validate_header(header: PushHeader) -> PushHeader:
    """Check names and normalise precision/format; INVALID_ARGUMENT says what is wrong."""
    if not _NAME.match(header.name or ""):
        raise InvalidArgument(f"model name {header.name!r} must match {_NAME.pattern}")
    if not _NAME.match(header.version or ""):
        raise InvalidArgument(f"model version {header.version!r} must match {_NAME.pattern}")
    precision = (header.precision or "FP32").upper()
    if precision not in PRECISIONS:
        raise InvalidArgument(f"precision {header.precision!r} must be one of {list(PRECISIONS)}")
    fmt = (header.format or "onnx").lower()
    if fmt != "onnx":
        raise InvalidArgument(f"format {header.format!r} is not supported (only 'onnx')")
    return PushHeader(header.name, header.version, precision, fmt, dict(header.metadata))


class Registry:
    def __init__(self, store: RegistryStore, publish: Publisher | None = None,
                 max_artifact_bytes: int = 1 << 30):
        self.store = store
        self.publish = publish
        self.max_artifact_bytes = max_artifact_bytes

    async def add_version(self, header: PushHeader, chunks: AsyncIterator[bytes]) -> ModelVariant:
        header = validate_header(header)
        temp = self.store.incoming / f"{uuid.uuid4().hex}.part"
        digest, size = hashlib.sha256(), 0
        try:
            with temp.open("wb") as fh:
                async for data in chunks:
                    size += len(data)
                    if size > self.max_artifact_bytes:
                        raise ResourceExhausted(
                            f"artifact exceeds the {self.max_artifact_bytes}-byte limit"
                        )
                    digest.update(data)
                    fh.write(data)
            if size == 0:
                raise InvalidArgument("artifact is empty")
            inputs, outputs = await asyncio.to_thread(inspect_onnx, temp)
            sha = digest.hexdigest()
            await asyncio.to_thread(self.store.adopt_blob, temp, sha)
        finally:
            temp.unlink(missing_ok=True)
        variant = ModelVariant(
            name=header.name, version=header.version, precision=header.precision,
            format=header.format, sha256=sha, size_bytes=size, inputs=inputs, outputs=outputs,
            metadata=header.metadata, created_at=time.time(),
        )
        await asyncio.to_thread(self.store.insert, variant)
        log.info("published %s sha256:%s (%d bytes)", variant.key, sha[:12], size)
        await self._announce(variant)
        return variant

    async def _announce(self, variant: ModelVariant) -> None:
        if self.publish is None:
            return
        payload = {"name": variant.name, "version": variant.version,
                   "precision": variant.precision, "sha256": variant.sha256,
                   "size_bytes": variant.size_bytes}
        try:
            await self.publish(events.MODEL_PUBLISHED, payload)
        except Exception as exc:  # noqa: BLE001 - the version is stored; the event is best effort
            log.warning("could not publish %s event for %s: %s", events.MODEL_PUBLISHED, variant.key, exc)

    async def list(self, name: str = "") -> list[ModelVariant]:
        variants = await asyncio.to_thread(self.store.variants, name)
        return sorted(variants, key=lambda v: (v.name, version_key(v.version), v.precision))

    async def get(self, name: str, version: str, precision: str) -> ModelVariant:
        for v in await asyncio.to_thread(self.store.variants, name):
            if v.version == version and v.precision == (precision or "FP32").upper():
                return v
        raise ModelNotFound(name, version, precision)

    async def resolve(self, name: str, version: str = "", precision: str = "") -> ModelVariant:
        return pick_variant(await asyncio.to_thread(self.store.variants, name), name, version, precision)

    async def record_measurement(self, name: str, version: str, precision: str, node_class: str,
                                 node_id: str, latency_ms: float, memory_bytes: int) -> ModelVariant:
        """Store what a runtime measured for a variant on its node class; returns the variant."""
        variant = await self.get(name, version, precision)
        if not _NAME.match(node_class or ""):
            raise InvalidArgument(f"node class {node_class!r} must match {_NAME.pattern}")
        if not (latency_ms >= 0 and memory_bytes >= 0):
            raise InvalidArgument("measured latency and memory must not be negative")
        await asyncio.to_thread(self.store.record_measurement, name, version, variant.precision,
                                node_class, node_id, latency_ms, memory_bytes, time.time())
        return await self.get(name, version, variant.precision)

    async def put_deployment(self, spec_json: str) -> tuple[DeploymentSpec, float]:
        spec = deployment.from_json(spec_json)
        if spec.ensemble:  # a name of its own, over models the registry has
            if await asyncio.to_thread(self.store.variants, spec.model):
                raise InvalidArgument(f"'{spec.model}' is a registered model; an ensemble needs a name of its own")
            for step in spec.ensemble:
                await self.resolve(step.model, step.version, step.precision)
        else:
            await self.resolve(spec.model)
            for version in {spec.rollout.stable, spec.rollout.canary} - {""}:  # NOT_FOUND naming it
                await self.resolve(spec.model, version)
        when = time.time()
        await asyncio.to_thread(self.store.put_deployment, spec.model, deployment.to_json(spec), when)
        if self.publish is not None:
            try:
                await self.publish(events.DEPLOYMENT_UPDATED, {"model": spec.model})
            except Exception as exc:  # noqa: BLE001 - stored; consumers also poll
                log.warning("could not publish deployment event for %s: %s", spec.model, exc)
        return spec, when

    async def deployments(self, model: str = "") -> list[tuple[DeploymentSpec, float]]:
        rows = await asyncio.to_thread(self.store.deployments, model)
        if model and not rows:
            raise NotFound(f"no deployment for model '{model}'")
        return [(deployment.from_json(text), when) for _, text, when in rows]

    def artifact_chunks(self, sha256: str) -> Iterator[bytes]:
        """Blocking iterator over an artifact's bytes."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or "") or not self.store.has_blob(sha256):
            raise ArtifactNotFound(sha256)
        with self.store.blob_path(sha256).open("rb") as fh:
            while data := fh.read(READ_CHUNK):
                yield data
