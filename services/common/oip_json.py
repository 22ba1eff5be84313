"""OIP REST v2 JSON <-> domain conversion, driven by the codec's datatype table, with Triton's
binary tensor data extension (a JSON header of `Inference-Header-Content-Length` bytes followed
by raw tensors, each JSON tensor naming its `binary_data_size`) and system shared memory (tensors
placed with `shared_memory_region` parameters, as over gRPC)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from services.common import codec, oip
from services.common.errors import InvalidArgument, TensorError
from services.common.shm import SharedMemoryRegions, TensorPlace, place_of

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data_output"  # request parameter: every output in binary unless it says


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        out = []
        for item in data:
            out.extend(_flatten(item) if isinstance(item, list) else [item])
        return out
    return [data]


def _name(obj: dict) -> str:
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("input without a 'name'")
    return name


def _shape(obj: dict, name: str) -> list[int]:
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise TensorError(name, "'shape' must be a list of integers")
    return shape


def tensor_from_json(obj: dict) -> tuple[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise InvalidArgument("each input must be a JSON object")
    name = _name(obj)
    dt = codec.datatype(obj.get("datatype", ""), name)
    shape = _shape(obj, name)
    values = _flatten(obj.get("data", []))
    count = codec.element_count(shape, name)
    if len(values) != count:
        raise TensorError(name, f"'data' has {len(values)} elements but shape {shape} needs {count}")
    try:
        if dt.name == "BYTES":
            array = np.empty(count, dtype=np.object_)
            array[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
        else:
            array = np.asarray(values, dtype=dt.dtype)
    except (TypeError, ValueError) as exc:
        raise TensorError(name, f"'data' does not fit {dt.name}: {exc}") from None
    return name, array.reshape(shape)


def _parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{what}: 'parameters' must be a JSON object")
    return params


class _Binary:
    """The binary section after the JSON header, handed out in input order."""

    def __init__(self, data: bytes | memoryview):
        self.data, self.used = memoryview(data), 0

    def take(self, size: Any, name: str) -> bytes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TensorError(name, f"'{BINARY_SIZE}' must be a non-negative integer")
        if self.used + size > len(self.data):
            raise TensorError(name, f"'{BINARY_SIZE}' is {size} but only {len(self.data) - self.used} "
                                    f"bytes of binary data are left")
        chunk = bytes(self.data[self.used:self.used + size])
        self.used += size
        return chunk


@dataclass
class JsonInfer:
    """A decoded REST request and how its outputs go back."""

    request: oip.InferRequest
    binary_outputs: frozenset[str]  # outputs asked for in binary
    binary_default: bool  # outputs not named in the request (or not saying) in binary


def request_from_json(model: str, version: str, body: Any, binary: bytes | memoryview = b"",
                      shm: SharedMemoryRegions | None = None) -> oip.InferRequest:
    """The JSON request `body` (plus the binary section after its header) as an InferRequest."""
    return infer_from_json(model, version, body, binary, shm).request


def infer_from_json(model: str, version: str, body: Any, binary: bytes | memoryview = b"",
                    shm: SharedMemoryRegions | None = None) -> JsonInfer:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InvalidArgument("request body must be a JSON object with an 'inputs' list")
    section = _Binary(binary)
    inputs: dict[str, np.ndarray] = {}
    for item in body["inputs"]:
        if not isinstance(item, dict):
            raise InvalidArgument("each input must be a JSON object")
        params = _parameters(item, f"input '{item.get('name', '')}'")
        place = place_of(params, f"input '{item.get('name', '')}'")
        if place is not None or BINARY_SIZE in params:
            name, array = _raw_tensor(item, params, place, section, shm)
        else:
            name, array = tensor_from_json(item)
        if name in inputs:
            raise TensorError(name, "appears twice in the request")
        inputs[name] = array
    if section.used != len(section.data):
        raise InvalidArgument(f"{len(section.data) - section.used} bytes of binary data are not claimed "
                              f"by any input's '{BINARY_SIZE}'")
    params = dict(_parameters(body, "request"))
    binary_default = bool(params.pop(BINARY_OUTPUT, False))
    outputs, places, binary_outputs = [], {}, set()
    for o in body.get("outputs", []):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidArgument("each requested output must be a JSON object with a 'name'")
        name, out_params = o["name"], _parameters(o, f"output '{o.get('name')}'")
        outputs.append(name)
        place = place_of(out_params, f"output '{name}'")
        if place is not None:
            if shm is None:
                raise InvalidArgument("this endpoint does not take tensors in shared memory")
            places[name] = place
        if out_params.get("binary_data", binary_default):
            binary_outputs.add(name)
    request = oip.InferRequest(model_name=model, model_version=version, id=str(body.get("id", "")),
                               parameters=params, inputs=inputs, outputs=outputs, output_places=places)
    return JsonInfer(request, frozenset(binary_outputs), binary_default and not outputs)


def _raw_tensor(obj: dict, params: dict, place: TensorPlace | None, section: _Binary,
                shm: SharedMemoryRegions | None) -> tuple[str, np.ndarray]:
    name = _name(obj)
    shape = _shape(obj, name)
    if place is not None:
        if shm is None:
            raise InvalidArgument("this endpoint does not take tensors in shared memory")
        data = shm.read(place, f"input '{name}'")
    else:
        data = section.take(params[BINARY_SIZE], name)
    return name, codec.from_raw(data, obj.get("datatype", ""), shape, name)


def _json_values(array: np.ndarray) -> list:
    if array.dtype == np.object_:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in array.reshape(-1)]
    if codec.datatype_of(array).name in ("FP16", "BF16"):
        return array.astype(np.float32).reshape(-1).tolist()
    return array.reshape(-1).tolist()


def response_to_json(resp: oip.InferResponse, binary: JsonInfer | None = None,
                     shm: SharedMemoryRegions | None = None) -> dict | tuple[bytes, int]:
    """The JSON response; with `binary` (the decoded request) outputs asked for in binary come
    after the JSON as raw bytes and outputs placed in shared memory are written there: then
    (body, length of its JSON header) when any output is binary, else the JSON object."""
    places = binary.request.output_places if binary else {}
    blobs: list[bytes] = []
    outputs = []
    for name, a in resp.outputs.items():
        out: dict[str, Any] = {"name": name, "datatype": codec.datatype_of(a, name).name, "shape": list(a.shape)}
        if name in places:
            data = codec.to_raw(a, name)
            shm.write(places[name], data, f"output '{name}'")  # no data and no parameters, as Triton
        elif binary and (name in binary.binary_outputs or binary.binary_default):
            blobs.append(codec.to_raw(a, name))
            out["parameters"] = {BINARY_SIZE: len(blobs[-1])}
        else:
            out["data"] = _json_values(a)
        outputs.append(out)
    body = {"model_name": resp.model_name, "model_version": resp.model_version, "id": resp.id,
            "parameters": resp.parameters, "outputs": outputs}
    if not blobs:
        return body
    header = json.dumps(body).encode()
    return b"".join([header, *blobs]), len(header)


def proto_to_json(message) -> dict:
    """A protobuf message as Triton's HTTP API writes it: field names as in the proto, 64-bit
    integers as JSON numbers (not strings), enums by name, scalars present even at their default."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _json_scalar(value_field, v) for k, v in value.items()}
        elif _repeated(field):
            out[field.name] = [_json_scalar(field, v) for v in value]
        elif field.message_type is not None:
            if message.HasField(field.name):
                out[field.name] = proto_to_json(value)
        elif field.containing_oneof is None or message.WhichOneof(field.containing_oneof.name) == field.name:
            out[field.name] = _json_scalar(field, value)
    return out


def _repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.28 (label is deprecated there)
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _json_scalar(field, value):
    if field.message_type is not None:
        return proto_to_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value
