"""Registering a federated job's trained weights as its model's next version: the FP32/FP16/INT8
variants built and pushed, each push made only while this trainer still holds the job."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.common.errors import AlreadyExists
from services.common.federated import Named, layers_from_named
from services.common.jobs import JobRecord
from services.common.registry_client import RegistryClient
from services.trainer import checkpoint, export
from services.trainer.evaluation import EvalData
from services.trainer.selection import next_version

log = logging.getLogger(__name__)
LeaseCheck = Callable[[], Awaitable[None]]  # LeaseLost unless this trainer still holds the job


def version_metadata(job: JobRecord, digest: str) -> dict[str, str]:
    """What a version records of the job that trained it (`digest`: its weights')."""
    spec = job.spec
    meta = {"federated_job": job.id, "federated_weights_sha256": digest, "federated_rounds": str(spec.rounds),
            "federated_strategy": spec.strategy, "parent_version": job.base_version,
            "federated_clients": ",".join(sorted({p for r in job.history for p in r.participants}))}
    if spec.dp_clip_norm > 0:  # what privacy the version was trained under travels with it
        meta.update({"federated_dp_clip_norm": str(spec.dp_clip_norm),
                     "federated_dp_noise_multiplier": str(spec.dp_noise_multiplier)})
    return meta


async def register_version(registry: RegistryClient, job: JobRecord, weights: Named, eval_data: EvalData,
                           out_dir: Path, check_lease: LeaseCheck) -> None:
    """Build the FP32/FP16/INT8 variants (in `out_dir`, measured on `eval_data`) and register them
    as the model's next version (or complete the version a trainer that stopped while registering
    it began with these very weights), checking before each push that this trainer still holds the
    job; the job's new version and its variants' accuracy recorded on it."""
    spec = job.spec
    digest = checkpoint.weights_digest(weights)
    built = await asyncio.to_thread(export.build_variants, layers_from_named(weights), out_dir, spec.model,
                                    *eval_data, version_metadata(job, digest))
    for _ in range(3):
        await check_lease()
        known = await registry.list(spec.model)
        # A trainer that stopped while registering this job's version of these weights: complete
        # it (a version of the job with other weights, begun by one that lost the job, is left).
        mine = [v for v in known if v.metadata.get("federated_job") == job.id
                and v.metadata.get("federated_weights_sha256") == digest]
        version = mine[0].version if mine else next_version([v.version for v in known])
        present = {v.precision for v in mine if v.version == version}
        try:
            for variant in built:
                if variant.precision not in present:
                    await check_lease()
                    await registry.push_file(variant.path, spec.model, version, variant.precision,
                                             variant.metadata)
                job.variant_accuracy[variant.precision] = float(variant.metadata["accuracy"])
            job.new_version = version
            return
        except AlreadyExists:
            log.warning("version %s of %s appeared meanwhile; trying the next one", version, spec.model)
    raise AlreadyExists(f"could not find a free version of model '{spec.model}' to register")
