"""The model manager's variant builder: FP16 and INT8 variants of any FP32 ONNX model, with how
closely each follows FP32 (and its accuracy when labelled data is given). Pure CPU work on files
and protobufs: no transport, no event loop; callers run it off their loop."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.common.errors import InvalidArgument
from services.models.digits import accuracy
from services.models.onnx_mlp import quantize_int8

BUILDABLE = ("FP16", "INT8")
PROBE_ROWS = 256
SEED = 0


@dataclass(frozen=True)
class BuiltVariant:
    precision: str
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)


def _half(tensor: TensorProto) -> TensorProto:
    out = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)
    return out


def _is_float(value: onnx.ValueInfoProto) -> bool:
    return value.type.tensor_type.elem_type == TensorProto.FLOAT


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float weights and constants to half; float inputs are cast to half on the way in and float
    outputs back to float on the way out, so callers keep the FP32 interface."""
    m = copy.deepcopy(model)
    g = m.graph
    weights = {init.name for init in g.initializer}
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_half(init))
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_half(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    head, tail = [], []
    for inp in (i for i in g.input if _is_float(i) and i.name not in weights):
        half = f"{inp.name}__fp16"
        _rename_uses(g, inp.name, half)
        head.append(helper.make_node("Cast", [inp.name], [half], to=TensorProto.FLOAT16))
    for out in (o for o in g.output if _is_float(o)):
        half = f"{out.name}__fp16"
        _rename_uses(g, out.name, half, outputs_too=True)
        tail.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # intermediate types changed; let shape inference redo them
    onnx.checker.check_model(m)
    return m


def _rename_uses(graph: onnx.GraphProto, old: str, new: str, outputs_too: bool = False) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        if outputs_too:
            node.output[:] = [new if name == old else name for name in node.output]


def probe_inputs(model_path: Path, rows: int = PROBE_ROWS, seed: int = SEED) -> dict[str, np.ndarray]:
    """Generated inputs for every model input: dynamic dimensions become `rows` (the first) or 1."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in session.get_inputs():
        if spec.type != "tensor(float)":
            raise InvalidArgument(f"input '{spec.name}' is {spec.type}: only float inputs can be probed")
        shape = [d if isinstance(d, int) and d > 0 else (rows if i == 0 else 1) for i, d in enumerate(spec.shape)]
        inputs[spec.name] = rng.random(shape, dtype=np.float32) * 16.0
    return inputs


def run(model_path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, inputs)[0], dtype=np.float32)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, str]:
    """How closely a variant follows FP32 on the same inputs (top-1 agreement when 2-D)."""
    meta = {"max_abs_diff_vs_fp32": f"{float(np.max(np.abs(reference - candidate))):.6g}"}
    if reference.ndim == 2 and reference.shape[1] > 1:
        agree = float((reference.argmax(1) == candidate.argmax(1)).mean())
        meta["top1_agreement_vs_fp32"] = f"{agree:.4f}"
    return meta


def build_one(fp32_path: Path, precision: str, out_dir: Path) -> Path:
    """Write one variant of `fp32_path` into `out_dir` (InvalidArgument when it cannot be built)."""
    if precision not in BUILDABLE:
        raise InvalidArgument(f"can build {list(BUILDABLE)} variants, not {precision!r}")
    target = out_dir / f"{fp32_path.stem}-{precision.lower()}.onnx"
    try:
        if precision == "FP16":
            onnx.save(to_fp16(onnx.load(str(fp32_path))), str(target))
        else:
            quantize_int8(fp32_path, target)
        run(target, probe_inputs(fp32_path, rows=2))  # it must load and run in ONNX Runtime
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - converter or runtime refusal, reported to the user
        raise InvalidArgument(f"{precision} variant of {fp32_path.name} could not be built: "
                              f"{type(exc).__name__}: {exc}") from None
    return target


def describe(fp32_path: Path, variant_path: Path, eval_data: tuple[np.ndarray, np.ndarray] | None,
             parent_sha256: str) -> dict[str, str]:
    """Metadata of a built variant: fidelity to FP32 on generated inputs, accuracy when labelled
    data is given, and where it came from."""
    probe = probe_inputs(fp32_path)
    meta = compare(run(fp32_path, probe), run(variant_path, probe))
    meta.update({"built_from_sha256": parent_sha256, "builder": "cnei models build"})
    if eval_data is not None:
        meta["accuracy"] = f"{accuracy(variant_path, *eval_data):.4f}"  # top-1 on the labelled data
    return meta
