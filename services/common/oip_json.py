"""OIP REST v2 JSON <-> domain conversion, driven by the codec's datatype table."""
from __future__ import annotations

from typing import Any

import numpy as np

from services.common import codec, oip
from services.common.errors import InvalidArgument, TensorError


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        out = []
        for item in data:
            out.extend(_flatten(item) if isinstance(item, list) else [item])
        return out
    return [data]


def tensor_from_json(obj: dict) -> tuple[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise InvalidArgument("each input must be a JSON object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("input without a 'name'")
    dt = codec.datatype(obj.get("datatype", ""), name)
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise TensorError(name, "'shape' must be a list of integers")
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


def request_from_json(model: str, version: str, body: Any) -> oip.InferRequest:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InvalidArgument("request body must be a JSON object with an 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    for item in body["inputs"]:
        name, array = tensor_from_json(item)
        if name in inputs:
            raise TensorError(name, "appears twice in the request")
        inputs[name] = array
    outputs = [o.get("name", "") for o in body.get("outputs", []) if isinstance(o, dict)]
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be a JSON object")
    return oip.InferRequest(model_name=model, model_version=version, id=str(body.get("id", "")),
                            parameters=params, inputs=inputs, outputs=outputs)


def _json_values(array: np.ndarray) -> list:
    if array.dtype == np.object_:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in array.reshape(-1)]
    if codec.datatype_of(array).name in ("FP16", "BF16"):
        return array.astype(np.float32).reshape(-1).tolist()
    return array.reshape(-1).tolist()


def response_to_json(resp: oip.InferResponse) -> dict:
    return {
        "model_name": resp.model_name,
        "model_version": resp.model_version,
        "id": resp.id,
        "parameters": resp.parameters,
        "outputs": [
            {"name": name, "datatype": codec.datatype_of(a, name).name, "shape": list(a.shape),
             "data": _json_values(a)}
            for name, a in resp.outputs.items()
        ],
    }
