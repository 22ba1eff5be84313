"""OIP request/response <-> domain conversion shared by every service (built on the codec)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.common import classification, codec
from services.common.errors import InvalidArgument, TensorError
from services.common.shm import BYTE_SIZE, OFFSET, REGION, SharedMemoryRegions, TensorPlace, place_of
from services.pb.inference import grpc_service_pb2 as pb

Params = dict[str, Any]


@dataclass
class InferRequest:
    """A transport-free inference request."""

    model_name: str
    inputs: dict[str, np.ndarray]
    model_version: str = ""
    id: str = ""
    parameters: Params = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    raw: bool = True
    # requested outputs the caller wants written into its shared memory, not sent back
    output_places: dict[str, TensorPlace] = field(default_factory=dict)
    # requested outputs answered as their top classes (Triton's classification extension): count
    classes: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows of the batch: the first input's first dimension (1 without inputs)."""
        return int(next(iter(self.inputs.values())).shape[0]) if self.inputs else 1


@dataclass
class InferResponse:
    """A transport-free inference response."""

    model_name: str
    outputs: dict[str, np.ndarray]
    model_version: str = ""
    id: str = ""
    parameters: Params = field(default_factory=dict)


def params_from_proto(params) -> Params:
    """`map<string, InferParameter>` -> plain dict."""
    out: Params = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, kind) if kind else None
    return out


def params_to_proto(values: Params, params) -> None:
    """Plain dict -> `map<string, InferParameter>` (bool, int, float, str)."""
    for key, value in values.items():
        slot = params[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, (int, np.integer)):
            slot.int64_param = int(value)
        elif isinstance(value, (float, np.floating)):
            slot.double_param = float(value)
        else:
            slot.string_param = str(value)


def _places(tensors, what: str) -> list[TensorPlace | None]:
    """Where each tensor's parameters place it in shared memory (None: not there)."""
    return [place_of(params_from_proto(t.parameters), f"{what} '{t.name}'") if t.parameters else None
            for t in tensors]


def request_from_proto(request: pb.ModelInferRequest, shm: SharedMemoryRegions | None = None) -> InferRequest:
    """Decode a ModelInferRequest, validating every tensor against its shape and datatype.
    Inputs placed in shared memory are read from `shm` (raw_input_contents then holds only the
    others, in order); outputs placed there are noted for `response_to_proto`."""
    if not request.model_name:
        raise InvalidArgument("model_name is required")
    places = _places(request.inputs, "input")
    out_places = _places(request.outputs, "output")
    if shm is None and any(places + out_places):
        raise InvalidArgument("this endpoint does not take tensors in shared memory")
    raw = list(request.raw_input_contents)
    sent = sum(p is None for p in places)
    if raw and len(raw) != sent:
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{sent} inputs not in shared memory"
        )
    inputs: dict[str, np.ndarray] = {}
    next_raw = 0
    for i, tensor in enumerate(request.inputs):
        if not tensor.name:
            raise InvalidArgument(f"input {i} has no name")
        if tensor.name in inputs:
            raise TensorError(tensor.name, "appears twice in the request")
        shape = list(tensor.shape)
        if places[i] is not None:
            data = shm.read(places[i], f"input '{tensor.name}'")
            inputs[tensor.name] = codec.from_raw(data, tensor.datatype, shape, tensor.name)
        elif raw:
            if tensor.HasField("contents"):  # which would be meant? Triton refuses it too, in these words
                raise InvalidArgument(f"contents field must not be specified when using raw_input_contents "
                                      f"for '{tensor.name}' for model '{request.model_name}'")
            inputs[tensor.name] = codec.from_raw(raw[next_raw], tensor.datatype, shape, tensor.name)
            next_raw += 1
        else:
            inputs[tensor.name] = codec.from_contents(
                tensor.contents, tensor.datatype, shape, tensor.name
            )
    output_places = {o.name: p for o, p in zip(request.outputs, out_places) if p is not None}
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        parameters=params_from_proto(request.parameters),
        inputs=inputs,
        outputs=[o.name for o in request.outputs],
        raw=bool(raw) or not request.inputs or sent < len(places),
        output_places=output_places,
        classes=classes_from_proto(request.outputs, output_places),
    )


def classes_from_proto(outputs, placed: dict[str, TensorPlace] | None = None) -> dict[str, int]:
    """The requested outputs (ModelInferRequest.outputs) that ask for their top classes: count."""
    return classification.requested({o.name: params_from_proto(o.parameters) for o in outputs if o.parameters},
                                    placed or {})


def request_to_proto(req: InferRequest) -> pb.ModelInferRequest:
    """Encode an InferRequest; raw unless `req.raw` is False."""
    msg = pb.ModelInferRequest(model_name=req.model_name, model_version=req.model_version, id=req.id)
    params_to_proto(req.parameters, msg.parameters)
    for name, array in req.inputs.items():
        tensor = msg.inputs.add(
            name=name, datatype=codec.datatype_of(array, name).name, shape=array.shape
        )
        if req.raw:
            msg.raw_input_contents.append(codec.to_raw(array, name))
        else:
            codec.to_contents(array, tensor.contents, name)
    for name in req.outputs:
        msg.outputs.add(name=name)
    return msg


def _needs_raw(outputs: dict[str, np.ndarray]) -> bool:
    return any(codec.datatype_of(a, n).contents_field is None for n, a in outputs.items())


def response_to_proto(resp: InferResponse, raw: bool = True, places: dict[str, TensorPlace] | None = None,
                      shm: SharedMemoryRegions | None = None) -> pb.ModelInferResponse:
    """Encode an InferResponse; raw when asked or when any output is raw-only (FP16/BF16).
    Outputs in `places` are written into `shm` instead: their tensor says where, and their
    raw_output_contents entry is empty (entries stay aligned with the outputs, as clients index
    them)."""
    raw = raw or bool(places) or _needs_raw(resp.outputs)
    msg = pb.ModelInferResponse(
        model_name=resp.model_name, model_version=resp.model_version, id=resp.id
    )
    params_to_proto(resp.parameters, msg.parameters)
    for name, array in resp.outputs.items():
        tensor = msg.outputs.add(
            name=name, datatype=codec.datatype_of(array, name).name, shape=array.shape
        )
        place = places.get(name) if places else None
        if place is not None:
            data = codec.to_raw(array, name)
            shm.write(place, data, f"output '{name}'")
            params_to_proto({REGION: place.region, BYTE_SIZE: len(data), OFFSET: place.offset},
                            tensor.parameters)
            msg.raw_output_contents.append(b"")
        elif raw:
            msg.raw_output_contents.append(codec.to_raw(array, name))
        else:
            codec.to_contents(array, tensor.contents, name)
    return msg


def response_from_proto(msg: pb.ModelInferResponse) -> InferResponse:
    """Decode a ModelInferResponse (raw or typed outputs)."""
    raw = list(msg.raw_output_contents)
    if raw and len(raw) != len(msg.outputs):
        raise InvalidArgument(
            f"raw_output_contents has {len(raw)} entries but the response has "
            f"{len(msg.outputs)} outputs"
        )
    outputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(msg.outputs):
        shape = list(tensor.shape)
        if raw:
            outputs[tensor.name] = codec.from_raw(raw[i], tensor.datatype, shape, tensor.name)
        else:
            outputs[tensor.name] = codec.from_contents(
                tensor.contents, tensor.datatype, shape, tensor.name
            )
    return InferResponse(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        parameters=params_from_proto(msg.parameters),
        outputs=outputs,
    )
