"""ModelVariant (and Tombstone) <-> registry proto conversion."""
from __future__ import annotations

from services.common.model_spec import ModelVariant, TensorSpec, Tombstone
from services.pb.cnei import registry_pb2 as rpb


def spec_to_proto(spec: TensorSpec) -> rpb.TensorSpec:
    return rpb.TensorSpec(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def spec_from_proto(msg: rpb.TensorSpec) -> TensorSpec:
    return TensorSpec(name=msg.name, datatype=msg.datatype, shape=tuple(msg.shape))


def variant_to_proto(v: ModelVariant) -> rpb.ModelVersion:
    return rpb.ModelVersion(
        name=v.name, version=v.version, precision=v.precision, format=v.format,
        sha256=v.sha256, size_bytes=v.size_bytes, metadata=v.metadata,
        inputs=[spec_to_proto(s) for s in v.inputs],
        outputs=[spec_to_proto(s) for s in v.outputs], created_at=v.created_at,
    )


def variant_from_proto(msg: rpb.ModelVersion) -> ModelVariant:
    return ModelVariant(
        name=msg.name, version=msg.version, precision=msg.precision, format=msg.format,
        sha256=msg.sha256, size_bytes=msg.size_bytes, metadata=dict(msg.metadata),
        inputs=[spec_from_proto(s) for s in msg.inputs],
        outputs=[spec_from_proto(s) for s in msg.outputs], created_at=msg.created_at,
    )


def tombstone_to_proto(t: Tombstone) -> rpb.DeletedVariant:
    return rpb.DeletedVariant(name=t.name, version=t.version, precision=t.precision, sha256=t.sha256,
                              deleted_at=t.deleted_at)


def tombstone_from_proto(msg: rpb.DeletedVariant) -> Tombstone:
    return Tombstone(name=msg.name, version=msg.version, precision=msg.precision, sha256=msg.sha256,
                     deleted_at=msg.deleted_at)
