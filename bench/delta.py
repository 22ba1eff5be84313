"""`make bench-delta`: how much of a new model version crosses the wire as a delta.

python bench/delta.py [--quick]
Makes new versions of `wide_mlp` (17 MB FP32, 4 MB INT8) the way training leaves them — the last
layer fine-tuned, every weight moved a little (as a federated round does), the graph renamed as
well — and measures each delta against the version before it (services/common/delta.py, as the
registry makes them): its size, against the artifact and against zlib of the artifact, and the
time to make and to apply it. Results: bench/results/delta.{md,json} (quick.delta.* for --quick)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import MODELS_DIR, log, run_meta  # noqa: E402
from services.common import delta  # noqa: E402
from services.models import wide_mlp  # noqa: E402

RESULTS = REPO / "bench" / "results"
Change = Callable[[onnx.ModelProto, np.random.Generator], None]


def _moved(model: onnx.ModelProto, rng: np.random.Generator, names: set[str] | None, how: Callable) -> None:
    for init in model.graph.initializer:
        if (names is None or init.name in names) and init.data_type == onnx.TensorProto.FLOAT:
            array = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(how(array, rng).astype(array.dtype), init.name))


def last_layer(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    _moved(model, rng, {"W2", "B2"}, lambda a, r: a + r.normal(0, 0.01, a.shape))


def every_weight(relative: float) -> Change:
    def change(model: onnx.ModelProto, rng: np.random.Generator) -> None:
        _moved(model, rng, None, lambda a, r: a * (1 + r.normal(0, relative, a.shape)))
    return change


def renamed_and(change: Change) -> Change:
    def both(model: onnx.ModelProto, rng: np.random.Generator) -> None:
        model.graph.name += "-retrained-on-site-a-round-12"  # the header grows: the tensors shift
        change(model, rng)
    return both


SCENARIOS: list[tuple[str, str, Change]] = [
    ("FP32", "last layer fine-tuned", last_layer),
    ("FP32", "every weight moved 0.1 %", every_weight(1e-3)),
    ("FP32", "every weight moved 1 %", every_weight(1e-2)),
    ("FP32", "graph renamed, every weight moved 0.1 %", renamed_and(every_weight(1e-3))),
    ("INT8", "graph renamed (weights unchanged)", renamed_and(lambda m, r: None)),
]


def measure(base: bytes, target: bytes, repeats: int) -> dict:
    made_s, applied_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        made = delta.encode(base, target)
        made_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert delta.decode(base, made) == target, "a delta that does not give back the artifact"
        applied_s.append(time.perf_counter() - started)
    zlib_bytes = len(zlib.compress(target, delta.LEVEL))
    return {"artifact_bytes": len(target), "delta_bytes": len(made), "zlib_bytes": zlib_bytes,
            "delta_of_artifact": len(made) / len(target), "delta_of_zlib": len(made) / zlib_bytes,
            "make_s": min(made_s), "apply_s": min(applied_s)}


def table(rows: list[dict], meta: dict) -> str:
    lines = ["# Delta updates (`make bench-delta`)", "",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| variant | new version | artifact | delta | of artifact | of zlib(artifact) | make | apply |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| wide_mlp {r['precision']} | {r['scenario']} | {r['artifact_bytes'] / 1e6:.1f} MB | "
                     f"{r['delta_bytes'] / 1e6:.2f} MB | {100 * r['delta_of_artifact']:.1f} % | "
                     f"{100 * r['delta_of_zlib']:.1f} % | {r['make_s']:.2f} s | {r['apply_s']:.2f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timing per scenario, results aside")
    args = parser.parse_args(argv)
    started, load = time.time(), os.getloadavg()[0]
    files = {v.precision: v.path for v in wide_mlp.build(MODELS_DIR)}
    rows = []
    for precision, scenario, change in SCENARIOS:
        base = files[precision].read_bytes()
        model = onnx.load_from_string(base)
        change(model, np.random.default_rng(0))
        row = {"precision": precision, "scenario": scenario,
               **measure(base, model.SerializeToString(), 1 if args.quick else 3)}
        log(f"wide_mlp {precision}, {scenario}: delta {row['delta_bytes']:,} of {row['artifact_bytes']:,} bytes "
            f"({100 * row['delta_of_artifact']:.1f} %), made in {row['make_s']:.2f} s, applied in {row['apply_s']:.2f} s")
        rows.append(row)
    meta = run_meta(args.quick, started, load)
    stem = "quick.delta" if args.quick else "delta"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table(rows, meta))
    log(f"wrote {RESULTS / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
