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
from services.models.digits import accuracy, fixed_batch
from services.models.onnx_mlp import quantize_int8

BUILDABLE = ("FP16", "INT8")
PROBE_ROWS = 256
SEED = 0
MIN_AGREEMENT = 0.9  # the top-1 agreement with FP32 below which a variant is refused
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
PROBE_INTEGER_BOUND = 4  # generated integer inputs are 0..3 (indices into the smallest tables)


@dataclass(frozen=True)
class BuiltVariant:
    precision: str
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)


def _half(tensor: TensorProto) -> TensorProto:
    """The tensor in half precision; InvalidArgument when a finite value lies beyond FP16's range
    (it would become inf, and every output it reaches inf or NaN)."""
    values = numpy_helper.to_array(tensor)
    finite = values[np.isfinite(values)]
    if finite.size and float(np.max(np.abs(finite))) > FP16_MAX:
        raise InvalidArgument(f"FP16 variant refused: weight '{tensor.name}' holds values up to "
                              f"{float(np.max(np.abs(finite))):.6g}, beyond the FP16 range (+-{FP16_MAX:g})")
    return numpy_helper.from_array(values.astype(np.float16), tensor.name)


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


def _probe(spec, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Generated values for one input: floats 0..16, small non-negative integers, booleans."""
    kind = spec.type[len("tensor("):-1]
    if kind == "float":
        return rng.random(shape, dtype=np.float32) * 16.0
    if kind == "bool":
        return rng.random(shape) < 0.5
    if kind in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        return rng.integers(0, PROBE_INTEGER_BOUND, shape).astype(kind)
    if kind in ("float16", "double", "bfloat16"):
        raise InvalidArgument(f"input '{spec.name}' is {spec.type}: variants are built from an FP32 model "
                              "(float inputs), and this one is not")
    raise InvalidArgument(f"input '{spec.name}' is {spec.type}: only float, integer and bool inputs can be probed")


def probe_batches(model_path: Path, rows: int = PROBE_ROWS, seed: int = SEED) -> list[dict[str, np.ndarray]]:
    """Generated inputs for every model input, `rows` samples in all: in one batch when the first
    dimension is dynamic, else in as many batches of its fixed size as it takes (other dynamic
    dimensions become 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    specs = session.get_inputs()
    batch = next((b for b in map(fixed_batch, (s.shape for s in specs)) if b), rows)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(max(1, -(-rows // batch))):
        feeds.append({s.name: _probe(s, [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1)
                                         for i, d in enumerate(s.shape)], rng) for s in specs})
    return feeds


def probe_inputs(model_path: Path, rows: int = PROBE_ROWS, seed: int = SEED) -> dict[str, np.ndarray]:
    """One batch of generated inputs (the first of probe_batches)."""
    return probe_batches(model_path, rows, seed)[0]


def run(model_path: Path, feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every output by name, the batches' results joined along the first axis."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = [session.run(names, f) for f in ([feeds] if isinstance(feeds, dict) else feeds)]
    joined = {}
    for i, name in enumerate(names):
        parts = [np.asarray(r[i]) for r in results]
        joined[name] = np.concatenate(parts) if parts[0].ndim else np.stack(parts)
    return joined


def _compare_output(name: str, ref: np.ndarray, cand: np.ndarray, precision: str) -> dict[str, float]:
    """Max |diff| (and top-1 agreement when 2-D) of one float output; InvalidArgument when the
    variant's output is inf/NaN where FP32's is finite."""
    ref, cand = ref.astype(np.float64), cand.astype(np.float64)
    broken = np.isfinite(ref) & ~np.isfinite(cand)
    if broken.any():
        raise InvalidArgument(f"{precision} variant refused: output '{name}' is inf/NaN on {int(broken.sum())} of "
                              f"{ref.size} probe values where FP32's are finite (values beyond the "
                              f"{precision} range?)")
    both = np.isfinite(ref) & np.isfinite(cand)
    out = {"max_abs_diff": float(np.max(np.abs(ref - cand)[both])) if both.any() else 0.0}
    if ref.ndim == 2 and ref.shape[1] > 1:
        out["top1_agreement"] = float((ref.argmax(1) == cand.argmax(1)).mean())
    return out


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], precision: str = "variant",
            min_agreement: float = 0.0) -> dict[str, str]:
    """How closely a variant follows FP32 on the same inputs, over every float output: the largest
    max |diff| and the lowest top-1 agreement (2-D outputs), each output's own too when there are
    several. InvalidArgument when an output turns inf/NaN, or agreement is below `min_agreement`."""
    measured = {name: _compare_output(name, ref, candidate[name], precision)
                for name, ref in reference.items() if ref.dtype.kind == "f"}
    meta = {}
    if measured:
        meta["max_abs_diff_vs_fp32"] = f"{max(m['max_abs_diff'] for m in measured.values()):.6g}"
    agreements = {name: m["top1_agreement"] for name, m in measured.items() if "top1_agreement" in m}
    if agreements:
        meta["top1_agreement_vs_fp32"] = f"{min(agreements.values()):.4f}"
    if len(measured) > 1:
        for name, m in measured.items():
            meta |= {f"{key}_vs_fp32.{name}": f"{value:.6g}" for key, value in m.items()}
    worst = min(agreements, key=agreements.get, default=None)
    if worst is not None and agreements[worst] < min_agreement:
        raise InvalidArgument(f"{precision} variant refused: top-1 agreement with FP32 on output '{worst}' is "
                              f"{agreements[worst]:.4f}, below the minimum {min_agreement:g} (--min-agreement)")
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
             parent_sha256: str, precision: str = "variant", min_agreement: float = MIN_AGREEMENT,
             eval_output: str = "") -> dict[str, str]:
    """Metadata of a built variant: fidelity to FP32 on generated inputs (InvalidArgument when it
    does not follow FP32: see compare), accuracy when labelled data is given (on `eval_output`, else
    the 2-D float output), and where it came from."""
    probe = probe_batches(fp32_path)
    meta = compare(run(fp32_path, probe), run(variant_path, probe), precision, min_agreement)
    meta.update({"built_from_sha256": parent_sha256, "builder": "cnei models build"})
    if eval_data is not None:
        meta["accuracy"] = f"{accuracy(variant_path, *eval_data, output=eval_output):.4f}"  # top-1
    return meta
