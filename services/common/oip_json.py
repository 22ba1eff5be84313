"""OIP REST v2 JSON <-> domain conversion, driven by the codec's datatype table, with Triton's
binary tensor data extension (a JSON header of `Inference-Header-Content-Length` bytes followed
by raw tensors, each JSON tensor naming its `binary_data_size`) and system shared memory (tensors
placed with `shared_memory_region` parameters, as over gRPC)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from services.common import classification, codec, oip
from services.common.errors import InvalidArgument, TensorError
from services.common.shm import SharedMemoryRegions, TensorPlace, place_of

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data_output"  # request parameter: every output in binary unless it says


# The JSON types an element of each datatype may be, as Triton reads them (AsBool, AsInt/AsUInt,
# AsDouble, AsString): a bool is no number, a number no string, null nothing.
_JSON_TYPES = {d.name: frozenset({bool} if d.name == "BOOL" else {str} if d.name == "BYTES"
                                 else {int} if np.issubdtype(d.dtype, np.integer) else {int, float})
               for d in codec.BY_NAME.values()}
_JSON_NAMES = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
INT64_RANGE = range(-(1 << 63), 1 << 63)


def _flatten(data: list) -> list:
    """Triton's 'data', flat or nested in rows to any depth, as one flat list (without recursion)."""
    if not any(isinstance(item, list) for item in data):
        return data
    out, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _name(obj: dict) -> str:
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("input without a 'name'")
    return name


def _shape(obj: dict, name: str) -> list[int]:
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise TensorError(name, f"'shape' must be a list of non-negative integers, not {_show(shape)}")
    return shape


def _show(value: Any) -> str:
    """A JSON value as the client wrote it, cut short for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_types(values: list, dt: codec.DataType, name: str) -> None:
    allowed = _JSON_TYPES[dt.name]
    if set(map(type, values)) <= allowed:
        return
    bad = next(v for v in values if type(v) not in allowed)
    kind = _JSON_NAMES[float if float in allowed else next(iter(allowed))]
    raise TensorError(name, f"'data' of {dt.name} must hold JSON {kind}, not {_show(bad)}")


def tensor_from_json(obj: dict) -> tuple[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise InvalidArgument("each input must be a JSON object")
    name = _name(obj)
    dt = codec.datatype(obj.get("datatype", ""), name)
    shape = _shape(obj, name)
    data = obj.get("data", [])
    if not isinstance(data, list):
        raise TensorError(name, f"'data' must be a JSON array, not {_show(data)}")
    values = _flatten(data)
    count = codec.element_count(shape, name)
    if len(values) != count:
        raise TensorError(name, f"'data' has {len(values)} elements but shape {shape} needs {count}")
    _check_types(values, dt, name)
    if dt.name != "BYTES":
        return name, codec.shaped(codec.typed_array(values, dt, name, "'data'"), shape, name)
    array = np.empty(count, dtype=np.object_)
    try:
        array[:] = [v.encode() for v in values]
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") is no UTF-8 text
        raise TensorError(name, f"'data' holds a string that is not valid Unicode: {exc}") from None
    return name, codec.shaped(array, shape, name)


def _parameters(obj: dict, what: str) -> dict:
    """Triton's parameters: a JSON object of strings, booleans, numbers and 64-bit integers."""
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{what}: 'parameters' must be a JSON object")
    for key, value in params.items():
        if not isinstance(value, (str, bool, int, float)) or (type(value) is int and value not in INT64_RANGE):
            raise InvalidArgument(f"{what}: parameter '{key}' must be a string, boolean, number or 64-bit "
                                  f"integer, not {_show(value)}")
    return params


def _flag(params: dict, key: str, default: bool, what: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what}: parameter '{key}' must be true or false, not {_show(value)}")
    return value


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
    inputs = _inputs(body["inputs"], _Binary(binary), shm)
    params = dict(_parameters(body, "request"))
    binary_default = _flag(params, BINARY_OUTPUT, False, "request")
    params.pop(BINARY_OUTPUT, None)
    request_id = body.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a JSON string, not {_show(request_id)}")
    outputs, places, binary_outputs, classes = _requested_outputs(body.get("outputs", []), binary_default, shm)
    request = oip.InferRequest(model_name=model, model_version=version, id=request_id, parameters=params,
                               inputs=inputs, outputs=outputs, output_places=places, classes=classes)
    return JsonInfer(request, frozenset(binary_outputs), binary_default and not outputs)


def _inputs(items: list, section: _Binary, shm: SharedMemoryRegions | None) -> dict[str, np.ndarray]:
    """The request's inputs: JSON data, binary data from `section` or shared memory."""
    inputs: dict[str, np.ndarray] = {}
    for item in items:
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
    return inputs


def _requested_outputs(requested: Any, binary_default: bool, shm: SharedMemoryRegions | None
                       ) -> tuple[list[str], dict[str, TensorPlace], set[str], dict[str, int]]:
    """The outputs asked for: their names, those placed in shared memory, those asked in binary,
    those asked as their top classes (with the count)."""
    if not isinstance(requested, list):
        raise InvalidArgument(f"'outputs' must be a JSON array of requested outputs, not {_show(requested)}")
    outputs, places, binary_outputs, parameters = [], {}, set(), {}
    for o in requested:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidArgument("each requested output must be a JSON object with a 'name'")
        name, out_params = o["name"], _parameters(o, f"output '{o.get('name')}'")
        outputs.append(name)
        parameters[name] = out_params
        place = place_of(out_params, f"output '{name}'")
        if place is not None:
            if shm is None:
                raise InvalidArgument("this endpoint does not take tensors in shared memory")
            places[name] = place
        if _flag(out_params, "binary_data", binary_default, f"output '{name}'"):
            binary_outputs.add(name)
    return outputs, places, binary_outputs, classification.requested(parameters, places)


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


def _json_number(value):
    """A number as strict JSON holds it: NaN and the infinities, which JSON has no token for, as
    the strings "NaN", "Infinity" and "-Infinity" (protobuf's JSON mapping; numpy and
    tritonclient's as_numpy read them back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
    return value


def _json_values(array: np.ndarray) -> list:
    if array.dtype == np.object_:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in array.reshape(-1)]
    if codec.datatype_of(array).name in ("FP16", "BF16"):
        array = array.astype(np.float32)
    flat = array.reshape(-1)
    if flat.dtype.kind != "f" or np.isfinite(flat).all():
        return flat.tolist()
    return [_json_number(v) for v in flat.tolist()]


def dumps(body: Any) -> str:
    """JSON text of a reply; strict: a non-finite number left in it is an error, never a bare
    NaN token that JSON parsers refuse."""
    return json.dumps(body, allow_nan=False)


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
    body = {"model_name": resp.model_name, "model_version": resp.model_version,
            **({"id": resp.id} if resp.id else {}),  # as Triton: no "id" for a request without one
            "parameters": {k: _json_number(v) for k, v in resp.parameters.items()}, "outputs": outputs}
    if not blobs:
        return body
    header = dumps(body).encode()
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
