"""Deleting from the registry: a model version (DeleteModel: its variants, their artifacts and
kept deltas no variant refers to any more, a tombstone of each), the tombstones kept (ListDeleted),
and a deployment (DeleteDeployment)."""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time

from services.common import deployment
from services.common.deployment import DeploymentSpec, EnsembleStep
from services.common.errors import FailedPrecondition, InvalidArgument, ModelNotFound, NotFound
from services.common.model_spec import PRECISIONS, ModelVariant, Tombstone
from services.common.served import versions_in_use
from services.registry.announce import Announcer
from services.registry.catalogue import Catalogue
from services.registry.deployment_checks import DeploymentChecks, changed_since

log = logging.getLogger(__name__)
DAY_S = 86400.0


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


class Deletion:
    """Deletions under the catalogue's naming lock (no push is catalogued and no deployment stored
    between their checks and them), announced once done."""

    def __init__(self, catalogue: Catalogue, checks: DeploymentChecks, announce: Announcer,
                 tombstone_retention_days: float = 90.0):
        """`tombstone_retention_days`: how long a deleted variant's tombstone is kept (those older
        are dropped now and with each deletion, and never listed)."""
        self.catalogue = catalogue
        self.store = catalogue.store
        self.checks = checks
        self.announce = announce
        self.tombstone_retention_s = tombstone_retention_days * DAY_S
        self.store.drop_tombstones(self._tombstones_since())

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

    async def delete_deployment(self, model: str, if_updated_at: float = 0.0) -> tuple[str, float]:
        """Delete the model's deployment: its JSON (`_as_stored`) and updated_at, announced as a
        deployment updated with `deleted: true`. The model is served with the defaults afterwards;
        an ensemble is gone. NOT_FOUND when none is stored; FAILED_PRECONDITION when another than
        the one read is (`if_updated_at`, as `Registry.put_deployment`'s), an ensemble runs it as a
        step, or an ensemble's step over the model would then run a version lacking its precision or
        a tensor it maps (`DeploymentChecks.steps_over` with the defaults)."""
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
