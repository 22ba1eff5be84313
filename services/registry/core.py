"""Registry core: take pushes, list, get and resolve model variants, record measurements, put
deployments (deletions and deployment checks are its collaborators'); no transport code here."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from services.common import deployment, model_metadata
from services.common.deployment import DeploymentSpec
from services.common.errors import FailedPrecondition, InvalidArgument, ModelNotFound, ResourceExhausted
from services.common.model_spec import PRECISIONS, ModelVariant, pick_variant, version_key
from services.registry.announce import Announcer, Publisher
from services.registry.catalogue import Catalogue
from services.registry.deletion import Deletion
from services.registry.deployment_checks import DeploymentChecks, changed_since
from services.registry.onnx_inspect import inspect_onnx
from services.registry.sending import ArtifactSender
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class PushHeader:
    name: str
    version: str
    precision: str = "FP32"
    format: str = "onnx"
    metadata: dict[str, str] = field(default_factory=dict)


def validate_header(header: PushHeader) -> PushHeader:
    """Check names and the metadata the services interpret (`model_metadata.check`), normalise
    precision/format; INVALID_ARGUMENT says what is wrong."""
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
    model_metadata.check(header.metadata)
    return PushHeader(header.name, header.version, precision, fmt, dict(header.metadata))


class Registry:
    def __init__(self, store: RegistryStore, publish: Publisher | None = None,
                 max_artifact_bytes: int = 1 << 30, tombstone_retention_days: float = 90.0,
                 concurrent_checks: int = 1):
        """`tombstone_retention_days`: how long a deleted variant's tombstone is kept (those older
        are dropped now and with each deletion, and never listed). `concurrent_checks`: pushes'
        ONNX checks run at once (each holds up to ~2.25 × its artifact in memory); the pushes
        beyond wait their turn."""
        self.store = store
        self.catalogue = Catalogue(store)
        self.announce = Announcer(publish)
        self.checks = DeploymentChecks(self.catalogue)
        self.deletion = Deletion(self.catalogue, self.checks, self.announce, tombstone_retention_days)
        self.max_artifact_bytes = max_artifact_bytes
        self._committing: set[asyncio.Future] = set()  # pushes being catalogued, whatever becomes of their calls
        self.artifacts = ArtifactSender(store, self.catalogue.executor)
        # its threads bound the checks running, even those whose push was cancelled meanwhile
        self._onnx_checks = ThreadPoolExecutor(concurrent_checks, thread_name_prefix="onnx-check")

    async def close(self) -> None:
        """Wait for the pushes being catalogued (and announced); stop making deltas."""
        if self._committing:
            await asyncio.wait(self._committing)
        self.artifacts.close()
        self.catalogue.close()
        self._onnx_checks.shutdown(wait=False)

    async def add_version(self, header: PushHeader, chunks: AsyncIterator[bytes]) -> ModelVariant:
        """Take a push; the variant catalogued (the one stored before when this very artifact was
        pushed as it already: a retry of a push whose answer was lost). Once the upload is in, it
        is catalogued and announced even when the call is cancelled meanwhile (a client's
        deadline): a version stored, and perhaps already served, is never left unannounced."""
        header = validate_header(header)
        await self._check_not_an_ensemble(header.name)  # before the upload; again as it is catalogued
        temp = self.store.incoming / f"{uuid.uuid4().hex}.part"
        try:
            sha, size = await self._receive(chunks, temp)
            variant = await self.catalogue.quick(self.store.pushed_before, header.name, header.version,
                                                 header.precision, sha, header.metadata)
            if variant is None:
                inputs, outputs = await asyncio.get_running_loop().run_in_executor(self._onnx_checks,
                                                                                   inspect_onnx, temp)
                variant = ModelVariant(
                    name=header.name, version=header.version, precision=header.precision,
                    format=header.format, sha256=sha, size_bytes=size, inputs=inputs, outputs=outputs,
                    metadata=header.metadata, created_at=time.time(),
                )
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        committing = asyncio.ensure_future(self._commit(temp, variant))
        self._committing.add(committing)
        committing.add_done_callback(self._committing.discard)
        return await asyncio.shield(committing)

    async def _commit(self, temp: Path, variant: ModelVariant) -> ModelVariant:
        """Catalogue the upload at `temp` as `variant` and announce it (announced again when it
        was stored before: that push's event may never have gone out)."""
        try:
            async with self.catalogue.naming:
                await self._check_not_an_ensemble(variant.name)
                stored = await asyncio.to_thread(self.store.add_variant, temp, variant)
        finally:
            temp.unlink(missing_ok=True)
        log.info("published %s sha256:%s (%d bytes)%s", stored.key, stored.sha256[:12], stored.size_bytes,
                 "" if stored is variant else ", pushed again")
        await self.announce.published(stored)
        await self._say_passed_over(stored)
        return stored

    async def _say_passed_over(self, stored: ModelVariant) -> None:
        """Warn of each ensemble step that passes the pushed version over for a tensor it maps, and
        of each ensemble whose steps type a tensor differently now that one runs it
        (`DeploymentChecks.after_push`), best effort: the push is in."""
        try:
            said = await self.checks.after_push(stored)
        except Exception as exc:  # noqa: BLE001 - a warning the push does not depend on
            log.warning("could not check the ensemble steps over %s: %s", stored.key, exc)
            return
        for warning in said:
            log.warning("%s", warning)

    async def _check_not_an_ensemble(self, name: str) -> None:
        """FAILED_PRECONDITION when an ensemble deployment has this name (a model of that name
        would take it over: the ensemble could never be applied again)."""
        if steps := await self.catalogue.ensemble_steps(name):
            raise FailedPrecondition(f"'{name}' is the name of an ensemble deployment (steps: "
                                     f"{' -> '.join(s.model for s in steps)}); a model needs a name of its own")

    async def _receive(self, chunks: AsyncIterator[bytes], temp: Path) -> tuple[str, int]:
        """Write the upload to `temp`; its sha256 and size (limit and emptiness checked)."""
        digest, size = hashlib.sha256(), 0
        with temp.open("wb") as fh:
            async for data in chunks:
                size += len(data)
                if size > self.max_artifact_bytes:
                    raise ResourceExhausted(f"artifact exceeds the {self.max_artifact_bytes}-byte limit")
                digest.update(data)
                fh.write(data)
        if size == 0:
            raise InvalidArgument("artifact is empty")
        return digest.hexdigest(), size

    async def list(self, name: str = "") -> list[ModelVariant]:
        variants = await self.catalogue.variants(name)
        return sorted(variants, key=lambda v: (v.name, version_key(v.version), v.precision))

    async def get(self, name: str, version: str, precision: str) -> ModelVariant:
        for v in await self.catalogue.variants(name):
            if v.version == version and v.precision == (precision or "FP32").upper():
                return v
        raise ModelNotFound(name, version, precision)

    async def resolve(self, name: str, version: str = "", precision: str = "") -> ModelVariant:
        return pick_variant(await self.catalogue.variants(name), name, version, precision)

    async def record_measurement(self, name: str, version: str, precision: str, node_class: str,
                                 node_id: str, latency_ms: float, memory_bytes: int) -> ModelVariant:
        """Store what a runtime measured for a variant on its node class; returns the variant."""
        variant = await self.get(name, version, precision)
        if not _NAME.match(node_class or ""):
            raise InvalidArgument(f"node class {node_class!r} must match {_NAME.pattern}")
        if not (0 <= latency_ms < math.inf and memory_bytes >= 0):
            raise InvalidArgument(f"measured latency and memory must not be negative, and latency must be finite "
                                  f"(latency_ms={latency_ms}, memory_bytes={memory_bytes})")
        await self.catalogue.quick(self.store.record_measurement, name, version, variant.precision,
                                   node_class, node_id, latency_ms, memory_bytes, time.time())
        return await self.get(name, version, variant.precision)

    async def put_deployment(self, spec_json: str, if_updated_at: float = 0.0) -> tuple[DeploymentSpec, float]:
        """Check and store a deployment; it and its updated_at (later than the one it replaces).
        `if_updated_at`: the updated_at of the deployment the caller read and changed (negative:
        it read none), FAILED_PRECONDITION when another is stored now (a read-modify-write
        racing another put); 0: put whatever is stored."""
        spec = deployment.check_put(deployment.from_json(spec_json))
        async with self.catalogue.naming:
            stored = await self.catalogue.quick(self.store.deployments, spec.model)
            stored_at = next((when for _, _, when in stored), None)
            if problem := changed_since(spec.model, if_updated_at, stored_at):
                raise FailedPrecondition(problem)
            if spec.ensemble:
                said = await self.checks.ensemble(spec)  # warnings, logged once it is stored
            else:
                said = []
                await self.checks.model_deployment(spec)
            when = time.time() if stored_at is None else max(time.time(), math.nextafter(stored_at, math.inf))
            await self.catalogue.quick(self.store.put_deployment, spec.model, deployment.to_json(spec), when)
        for warning in said:
            log.warning("%s", warning)
        await self.announce.deployment(spec.model)
        return spec, when
