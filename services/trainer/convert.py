"""Federated jobs <-> protobuf (cnei.trainer.v1)."""
from __future__ import annotations

import dataclasses

from services.common.jobs import JobRecord, JobSpec, RoundRecord
from services.pb.cnei import trainer_pb2 as tpb

DEFAULTS = JobSpec()
# StartJobRequest's `optional` fields (mu, the server optimiser's): a 0 sent is a 0, one left out
# takes the strategy's default
OPTIONAL = tuple(f.name for f in tpb.StartJobRequest.DESCRIPTOR.fields if f.has_presence)


def spec_from_proto(msg: tpb.StartJobRequest) -> JobSpec:
    """Fields left out take JobSpec's defaults: an `optional` field (mu, the server optimiser's)
    when absent, so a 0 sent is a 0; any other when 0, as proto3 cannot tell its 0 from unset."""
    values = {f.name: _field(msg, f.name) for f in dataclasses.fields(JobSpec)}
    values["strategy"] = values["strategy"].lower()
    return JobSpec(**values)


def _field(msg: tpb.StartJobRequest, name: str):
    if name in OPTIONAL:
        return getattr(msg, name) if msg.HasField(name) else getattr(DEFAULTS, name)
    return getattr(msg, name) or getattr(DEFAULTS, name)


def spec_to_proto(spec: JobSpec) -> tpb.StartJobRequest:
    return tpb.StartJobRequest(**{k: v for k, v in dataclasses.asdict(spec).items() if v is not None})


def round_to_proto(r: RoundRecord) -> tpb.RoundResult:
    return tpb.RoundResult(round=r.round, participants=r.participants, failed=r.failed, accuracy=r.accuracy,
                           loss=r.loss, seconds=r.seconds, attempt=r.attempt)


def round_from_proto(msg: tpb.RoundResult) -> RoundRecord:
    return RoundRecord(round=msg.round, participants=list(msg.participants), failed=list(msg.failed),
                       accuracy=msg.accuracy, loss=msg.loss, seconds=msg.seconds, attempt=msg.attempt)


def job_to_proto(job: JobRecord) -> tpb.Job:
    return tpb.Job(
        id=job.id, model=job.spec.model, base_version=job.base_version, state=job.state, round=job.round,
        rounds=job.spec.rounds, strategy=job.spec.strategy, history=[round_to_proto(r) for r in job.history],
        new_version=job.new_version, error=job.error, variant_accuracy=job.variant_accuracy,
        created_at=job.created_at, updated_at=job.updated_at, spec=spec_to_proto(job.spec))


def job_from_proto(msg: tpb.Job) -> JobRecord:
    return JobRecord(
        spec=spec_from_proto(msg.spec), id=msg.id, state=msg.state, round=msg.round,
        base_version=msg.base_version, history=[round_from_proto(r) for r in msg.history],
        new_version=msg.new_version, error=msg.error, variant_accuracy=dict(msg.variant_accuracy),
        created_at=msg.created_at, updated_at=msg.updated_at)
