"""Registry core: add, list, get and resolve model variants; no transport code here."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from services.common import deployment
from services.common.deployment import DeploymentSpec, EnsembleStep
from services.common.errors import FailedPrecondition, InvalidArgument, ModelNotFound, NotFound, ResourceExhausted
from services.common.model_spec import PRECISIONS, ModelVariant, Tombstone, pick_variant, version_key
from services.common.served import versions_in_use
from services.registry.onnx_inspect import inspect_onnx
from services.registry.announce import Announcer, Publisher
from services.registry.catalogue import Catalogue
from services.registry.deployment_checks import DeploymentChecks, changed_since
from services.registry.sending import ArtifactSender
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DAY_S = 86400.0


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


def _no_versions_of_an_ensemble(name: str, steps: tuple[EnsembleStep, ...]) -> str:
    """Why a version of ensemble `name` cannot be deleted: an ensemble is a deployment over models
    (FAILED_PRECONDITION, as gRPC's rmdir of a file; NOT_FOUND would deny the version 1 that its
    metadata shows)."""
    models = ", ".join(f"'{model}'" for model in dict.fromkeys(step.model for step in steps))
    return (f"'{name}' is an ensemble (a deployment), not a model: it has no versions to delete; the versions it "
            f"runs are its steps' models' ({models}), each deleted under its own name")


def _models_named(spec_json: str) -> dict[str, str] | None:
    """The models a stored deployment names, each with where (its own, its ensemble steps', its
    joint cloud model), from its JSON alone: for one that no longer reads as a whole. None when
    even that cannot be told."""
    try:
        data = json.loads(spec_json)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        return None
    steps, joint = data.get("ensemble", []), data.get("joint", {})
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("model"), str) for s in steps):
        return None
    if not isinstance(joint, dict) or not isinstance(joint.get("cloud_model", ""), str):
        return None
    named = {joint.get("cloud_model", ""): "as its joint cloud model"}
    named |= {step["model"]: "in an ensemble step" for step in steps}
    named[data["model"]] = "as its model"
    return {model: where for model, where in named.items() if model}


def _unreadable_over(name: str, version: str, stored: str, spec_json: str, why: str) -> str | None:
    """Why model `name` `version` cannot be deleted beside the stored deployment of model `stored`,
    which no longer reads (`why`): it names the model, or what it names cannot be told, so which
    versions it runs cannot be either; None when it names other models only."""
    named = _models_named(spec_json)
    if named is not None and name not in named:
        return None
    fix = f"put a valid deployment of '{stored}' (cnei deploy apply) or delete it (cnei deploy delete {stored})"
    if named is None:
        return (f"model '{name}' version {version} may be in use: the stored deployment of model '{stored}' no "
                f"longer reads ({why}) and what it runs cannot be told; {fix}")
    return (f"model '{name}' version {version} may be in use: the stored deployment of model '{stored}' names it "
            f"{named[name]} but no longer reads ({why}), so which of its versions it runs cannot be told; {fix}")


def _as_stored(text: str) -> str:
    """A stored deployment's JSON as GetDeployment answers it (every field), or as stored when it
    no longer reads (a deletion still takes it away)."""
    try:
        return deployment.to_json(deployment.from_json(text))
    except InvalidArgument:
        return text


class Registry:
    def __init__(self, store: RegistryStore, publish: Publisher | None = None,
                 max_artifact_bytes: int = 1 << 30, tombstone_retention_days: float = 90.0):
        """`tombstone_retention_days`: how long a deleted variant's tombstone is kept (those older
        are dropped now and with each deletion, and never listed)."""
        self.store = store
        self.catalogue = Catalogue(store)
        self.announce = Announcer(publish)
        self.checks = DeploymentChecks(self.catalogue)
        self.max_artifact_bytes = max_artifact_bytes
        self.tombstone_retention_s = tombstone_retention_days * DAY_S
        store.drop_tombstones(self._tombstones_since())
        self._committing: set[asyncio.Future] = set()  # pushes being catalogued, whatever becomes of their calls
        self.artifacts = ArtifactSender(store, self.catalogue.executor)

    async def close(self) -> None:
        """Wait for the pushes being catalogued (and announced); stop making deltas."""
        if self._committing:
            await asyncio.wait(self._committing)
        self.artifacts.close()
        self.catalogue.close()

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
                                                 header.precision, sha)
            if variant is None:
                inputs, outputs = await asyncio.to_thread(inspect_onnx, temp)
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
        return stored

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

    async def delete_version(self, name: str, version: str, precision: str = "") -> tuple[list[ModelVariant], int]:
        """Delete model `name` `version` (its `precision` variant, else all) and the artifacts no
        variant refers to any more; the variants deleted and the bytes freed, announced. NOT_FOUND
        when it has none such; FAILED_PRECONDITION while it is in use (`versions_in_use`). Under
        the naming lock: no push is catalogued and no deployment stored between check and delete."""
        if not name or not version:
            raise InvalidArgument("deleting a model version needs its name and version")
        precision = precision.upper()
        if precision and precision not in PRECISIONS:
            raise InvalidArgument(f"precision {precision!r} must be one of {list(PRECISIONS)}")
        async with self.catalogue.naming:
            variants = await self.catalogue.variants(name)
            if not any(v.version == version and precision in ("", v.precision) for v in variants):
                if not variants and (steps := await self.catalogue.ensemble_steps(name)):
                    raise FailedPrecondition(_no_versions_of_an_ensemble(name, steps))
                raise ModelNotFound(name, version, precision)
            refuse = functools.partial(_unreadable_over, name, version)
            readable = await self.catalogue.deployments(refuse_unreadable=refuse)
            in_use = versions_in_use(name, [spec for spec, _ in readable], variants)
            if version in in_use:
                raise FailedPrecondition(f"model '{name}' version {version} is in use: {in_use[version]}")
            removed, freed = await asyncio.to_thread(self.store.delete_variants, name, version, precision,
                                                     tombstones_since=self._tombstones_since())
        freed_bytes = sum({v.sha256: v.size_bytes for v in removed if v.sha256 in freed}.values())
        log.info("deleted %s (%d bytes of artifacts freed)", ", ".join(v.key for v in removed), freed_bytes)
        await self.announce.deleted(name, version, removed)
        return removed, freed_bytes

    async def deleted(self, name: str = "", since: float = 0.0) -> list[Tombstone]:
        """The tombstones of the variants deleted (of model `name`, else all) at or after `since`
        and within the retention, oldest first; a variant pushed again has none."""
        if math.isnan(since):  # compares false with every time: an empty list, though some are kept
            raise InvalidArgument(f"ListDeleted 'since' must be a number of seconds (Unix time), not {since}")
        return await self.catalogue.quick(self.store.tombstones, name, max(since, self._tombstones_since()))

    def _tombstones_since(self) -> float:
        """The oldest deletion whose tombstone is kept."""
        return time.time() - self.tombstone_retention_s

    async def record_measurement(self, name: str, version: str, precision: str, node_class: str,
                                 node_id: str, latency_ms: float, memory_bytes: int) -> ModelVariant:
        """Store what a runtime measured for a variant on its node class; returns the variant."""
        variant = await self.get(name, version, precision)
        if not _NAME.match(node_class or ""):
            raise InvalidArgument(f"node class {node_class!r} must match {_NAME.pattern}")
        if not (latency_ms >= 0 and memory_bytes >= 0):
            raise InvalidArgument("measured latency and memory must not be negative")
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
                await self.checks.ensemble(spec)
            else:
                await self.checks.model_deployment(spec)
            when = time.time() if stored_at is None else max(time.time(), math.nextafter(stored_at, math.inf))
            await self.catalogue.quick(self.store.put_deployment, spec.model, deployment.to_json(spec), when)
        await self.announce.deployment(spec.model)
        return spec, when

    async def delete_deployment(self, model: str, if_updated_at: float = 0.0) -> tuple[str, float]:
        """Delete the model's deployment: its JSON (`_as_stored`) and updated_at, announced as a
        deployment updated with `deleted: true`. The model is served with the defaults afterwards;
        an ensemble is gone. NOT_FOUND when none is stored; FAILED_PRECONDITION when another than
        the one read is (`if_updated_at`, as `put_deployment`'s), an ensemble runs it as a step, or
        an ensemble's step over the model would then run a version lacking its precision or a
        tensor it maps (`DeploymentChecks.steps_over` with the defaults)."""
        async with self.catalogue.naming:
            rows = await self.catalogue.quick(self.store.deployments, model) if model else []
            if not rows:
                raise NotFound(f"no deployment for model '{model}'")
            (_, text, stored_at), = rows
            if problem := changed_since(model, if_updated_at, stored_at):
                raise FailedPrecondition(problem)
            variants = await self.catalogue.variants(model)
            if not variants and (runners := await self._ensemble_runners(model)):
                raise FailedPrecondition(f"ensemble '{model}' is run by {', '.join(runners)}: delete those "
                                         "or change their steps first")
            if variants:  # its steps run the defaults' versions
                await self.checks.steps_over(DeploymentSpec(model), variants)
            await self.catalogue.quick(self.store.delete_deployment, model)
        log.info("deleted the deployment of model '%s'", model)
        await self.announce.deployment(model, deleted=True)
        return _as_stored(text), stored_at

    async def _ensemble_runners(self, model: str) -> list[str]:
        """The steps of other ensembles that run `model`, an ensemble (a name without variants: only
        its deployment makes it one; a registered model's steps run the model itself)."""
        return [f"ensemble '{spec.model}' step {i}" for spec, _ in await self.catalogue.deployments()
                if spec.model != model for i, step in enumerate(spec.ensemble) if step.model == model]
