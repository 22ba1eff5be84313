"""Domain view of a registered model variant and the checks of a request against it."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import numpy as np

from services.common import codec, model_metadata
from services.common.deployment import PRECISIONS, DeploymentSpec
from services.common.errors import InvalidArgument, ModelNotFound, TensorError

# Request parameter of every call a coordinator (or its front door) sends a node: a batch formed
# under the model's deployment, which the node takes up to the model's own max_batch_size rather
# than the one it shows its own clients (its own batching's: a deployment may batch more rows)
FORMED_BATCH = "cnei_formed_batch"
DEFAULT_MAX_BATCH_SIZE = 1024  # a batching model's max_batch_size when its metadata states none


@dataclass(frozen=True)
class TensorSpec:
    """Name, OIP datatype and shape of a model input or output (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass
class ModelVariant:
    """One registered (name, version, precision) artifact and what is known of it."""

    name: str
    version: str
    precision: str
    sha256: str
    size_bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    format: str = "onnx"
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}:{self.precision}"

    @property
    def max_batch_size(self) -> int:
        """Dynamic first dimension on every input means the model batches (Triton semantics), up
        to its `max_batch_size` metadata (1024 when it has none, or none that reads)."""
        if self.inputs and all(s.shape and s.shape[0] == -1 for s in self.inputs):
            stated = model_metadata.value(self.metadata, model_metadata.MAX_BATCH_SIZE, self.key)
            return DEFAULT_MAX_BATCH_SIZE if stated is None else stated
        return 0


@dataclass(frozen=True)
class Tombstone:
    """A variant deleted from the registry: its name, version, precision and artifact, and when
    (the registry's clock, Unix seconds)."""

    name: str
    version: str
    precision: str
    sha256: str
    deleted_at: float

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}:{self.precision}"


def sample_inputs(variant: ModelVariant, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-filled inputs matching the variant's signature (dynamic dims set to `batch`/1)."""
    out = {}
    for i, spec in enumerate(variant.inputs):
        shape = [batch if d < 0 and j == 0 else (1 if d < 0 else d) for j, d in enumerate(spec.shape)]
        dt = codec.datatype(spec.datatype, spec.name)
        out[spec.name] = (np.full(shape, b"", dtype=object) if dt.name == "BYTES"
                          else np.zeros(shape, dtype=dt.dtype))
    return out


def check_inputs(variant: ModelVariant, inputs: dict[str, np.ndarray], rows: bool = True) -> None:
    """Reject inputs whose names, datatypes or shapes do not match the model's inputs; with
    `rows` False, a batching model's row counts are not judged (a route for requests of any
    batch size, each of which is checked on its own)."""
    expected = {s.name: s for s in variant.inputs}
    for name in inputs:
        if name not in expected:
            raise TensorError(
                name, f"is not an input of model '{variant.name}' (inputs: {sorted(expected)})"
            )
    for spec in variant.inputs:
        if spec.name not in inputs:
            raise InvalidArgument(f"model '{variant.name}' needs input '{spec.name}'")
        array = inputs[spec.name]
        got = codec.datatype_of(array, spec.name).name
        if got != spec.datatype:
            raise TensorError(spec.name, f"datatype {got} but model expects {spec.datatype}")
        shape_ok = len(array.shape) == len(spec.shape) and all(
            want < 0 or want == have for want, have in zip(spec.shape, array.shape)
        )
        if not shape_ok:
            raise TensorError(
                spec.name, f"shape {list(array.shape)} but model expects {list(spec.shape)}"
            )
    if rows:
        check_batch_size(variant.name, {spec.name: inputs[spec.name] for spec in variant.inputs},
                         variant.max_batch_size)


def check_batch_size(model: str, inputs: dict[str, np.ndarray], max_batch_size: int) -> None:
    """Triton's check of one request's batch size for a model that batches (`max_batch_size` > 0,
    as its ModelConfig shows it): every input leads with the same batch dimension (a batcher
    splitting a batch by the first input's rows would hand a request's extra rows to the next
    caller), of at most `max_batch_size` rows; INVALID_ARGUMENT in Triton's words otherwise."""
    if not max_batch_size:
        return
    rows = {name: array.shape[0] for name, array in inputs.items() if array.ndim}
    if len(set(rows.values())) > 1:
        raise InvalidArgument(f"model '{model}' batches on the first dimension, but the inputs "
                              f"disagree on it: {', '.join(f'{k} {v}' for k, v in rows.items())}")
    if rows and next(iter(rows.values())) > max_batch_size:
        raise InvalidArgument(f"inference request batch-size must be <= {max_batch_size} for '{model}'")


def served_max_batch_size(variant: ModelVariant, deployment: DeploymentSpec | None) -> int:
    """The max_batch_size a server shows for `variant` (ModelConfig) and holds each client's
    request to, as Triton does: the model's (0: it takes no batch dimension), capped by the
    batching rules of `deployment` (the coordinator's deployment; a runtime's own batching) when
    there is one and it is no ensemble (an ensemble's steps batch on their own)."""
    limit = variant.max_batch_size
    if deployment is None or deployment.ensemble or not limit or deployment.batching.max_batch_size <= 0:
        return limit
    return min(limit, deployment.batching.max_batch_size)


def check_outputs(variant: ModelVariant, names: list[str]) -> None:
    """INVALID_ARGUMENT naming a requested output the model does not have."""
    known = [t.name for t in variant.outputs]
    for name in names:
        if name not in known:
            raise TensorError(name, f"is not an output of model '{variant.name}' (outputs: {sorted(known)})")


@functools.lru_cache(maxsize=4096)
def version_key(version: str) -> tuple:
    """Order versions numerically where they are numbers, else lexically."""
    parts = re.split(r"[.\-]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def pick_variant(variants: list[ModelVariant], name: str, version: str, precision: str) -> ModelVariant:
    """Resolution rule: latest version unless given; FP32, then FP16, then INT8 unless given."""
    if version:
        variants = [v for v in variants if v.version == version]
    if precision:
        variants = [v for v in variants if v.precision == precision.upper()]
    if not variants:
        raise ModelNotFound(name, version, precision)
    latest = max(version_key(v.version) for v in variants)
    candidates = [v for v in variants if version_key(v.version) == latest]
    return min(candidates, key=lambda v: PRECISIONS.index(v.precision))
