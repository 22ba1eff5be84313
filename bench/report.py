"""Ratios and tables from the measured points (pure), written as JSON and Markdown."""
from __future__ import annotations

import json
from pathlib import Path

COORDINATOR, EDGE = "coordinator", "edge-direct"


def peak(served: list[dict], model: str, precision: str, configs: list[str]) -> dict | None:
    """The point with the most infer/s among `configs` (any concurrency), failures left out."""
    points = [p for p in served if p["model"] == model and p["precision"] == precision
              and p["config"] in configs and not p["error"]]
    return max(points, key=lambda p: p["infer_per_s"], default=None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _where(p: dict | None) -> str:
    return f"{p['config']} c={p['concurrency']}" if p else "n/a"


def _inproc(inproc: list[dict], model: str, precision: str, batch: int) -> float | None:
    return next((p["samples_per_s"] for p in inproc
                 if (p["model"], p["precision"], p["batch"]) == (model, precision, batch)), None)


def _throughput(p: dict | None) -> float | None:
    return round(p["infer_per_s"], 1) if p else None


def ratios(served: list[dict], inproc: list[dict], registry: dict) -> dict:
    """The headline comparisons; a ratio is None where one side was not measured."""
    mlservers = sorted({p["config"] for p in served if p["config"].startswith("mlserver")})
    out: dict = {"coordinator_vs_best_mlserver": {}, "coordinator_vs_edge_direct": {}}
    for model in sorted({p["model"] for p in served}):
        coord, best = peak(served, model, "FP32", [COORDINATOR]), peak(served, model, "FP32", mlservers)
        edge = peak(served, model, "FP32", [EDGE])
        out["coordinator_vs_best_mlserver"][model] = {
            "coordinator": _throughput(coord), "coordinator_at": _where(coord),
            "best_mlserver": _throughput(best), "best_mlserver_at": _where(best),
            "ratio": _ratio(_throughput(coord), _throughput(best))}
        out["coordinator_vs_edge_direct"][model] = {
            "coordinator": _throughput(coord), "edge_direct": _throughput(edge),
            "ratio": _ratio(_throughput(coord), _throughput(edge))}
    coord_wide = peak(served, "wide_mlp", "FP32", [COORDINATOR])
    b32 = _inproc(inproc, "wide_mlp", "FP32", 32)
    b32 = round(b32, 1) if b32 else None
    out["coordinator_wide_mlp_vs_inprocess_batch32"] = {
        "coordinator_infer_per_s": _throughput(coord_wide), "inprocess_b32_samples_per_s": b32,
        "ratio": _ratio(_throughput(coord_wide), b32)}
    int8 = {f"inprocess_b{b}": _ratio(_inproc(inproc, "wide_mlp", "INT8", b), _inproc(inproc, "wide_mlp", "FP32", b))
            for b in (1, 32)}
    for config in (EDGE, COORDINATOR):
        int8[config] = _ratio(_throughput(peak(served, "wide_mlp", "INT8", [config])),
                              _throughput(peak(served, "wide_mlp", "FP32", [config])))
    out["wide_mlp_int8_vs_fp32_throughput"] = int8
    accuracy = {prec: float(meta["accuracy"]) for prec, meta in registry.get("digits", {}).items()
                if "accuracy" in meta}
    out["digits_int8_vs_fp32_accuracy"] = {
        "fp32": accuracy.get("FP32"), "int8": accuracy.get("INT8"), "fp16": accuracy.get("FP16"),
        "ratio": _ratio(accuracy.get("INT8"), accuracy.get("FP32")),
        "delta_points": (round((accuracy["INT8"] - accuracy["FP32"]) * 100, 2)
                         if {"INT8", "FP32"} <= accuracy.keys() else None)}
    return out


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def served_table(served: list[dict], model: str) -> str:
    rows = [[p["config"], p["precision"], p["concurrency"],
             "error" if p["error"] else f"{p['infer_per_s']:.1f}",
             "" if p["error"] else f"{p['p50_us']:.0f}", "" if p["error"] else f"{p['p99_us']:.0f}"]
            for p in served if p["model"] == model]
    return table(["config", "precision", "concurrency", "infer/s", "p50 µs", "p99 µs"], rows)


def pivot_table(served: list[dict], model: str) -> str:
    """config × concurrency → infer/s."""
    concurrencies = sorted({p["concurrency"] for p in served if p["model"] == model})
    keys = list(dict.fromkeys((p["config"], p["precision"]) for p in served if p["model"] == model))
    cell = {(p["config"], p["precision"], p["concurrency"]): p for p in served if p["model"] == model}
    rows = []
    for config, precision in keys:
        row = [config, precision]
        for c in concurrencies:
            p = cell.get((config, precision, c))
            row.append("" if p is None else ("error" if p["error"] else f"{p['infer_per_s']:.0f}"))
        rows.append(row)
    return table(["config", "precision"] + [f"c={c}" for c in concurrencies], rows)


CPU_GROUPS = ("client", "door", "coordinator", "runtime")


def cpu_table(served: list[dict], model: str) -> str:
    """µs of CPU per request by process, where measured (CNEI configs): what each request costs
    the machine that client and servers share."""
    rows = [[p["config"], p["precision"], p["concurrency"], f"{p['infer_per_s']:.0f}",
             *(f"{p['cpu_us'][g]:.0f}" if g in p["cpu_us"] else "–" for g in CPU_GROUPS),
             f"{sum(p['cpu_us'].values()):.0f}", f"{sum(p['cpu_us'].values()) * p['infer_per_s'] / 1e6:.2f}",
             f"{p['rows_per_execution']:.1f}" if p.get("rows_per_execution") else "–"]
            for p in served if p["model"] == model and p.get("cpu_us")]
    return table(["config", "precision", "concurrency", "infer/s", *CPU_GROUPS, "total µs", "cores at that rate",
                  "rows per ORT call"],
                 rows) if rows else ""


def inproc_table(inproc: list[dict]) -> str:
    rows = [[p["model"], p["precision"], p["batch"], f"{p['samples_per_s']:.0f}",
             f"{p['calls_per_s']:.0f}", f"{p['p50_us']:.0f}", f"{p['p99_us']:.0f}"] for p in inproc]
    return table(["model", "precision", "batch", "samples/s", "calls/s", "p50 µs/call", "p99 µs/call"], rows)


def ratio_lines(r: dict) -> list[str]:
    lines = []
    for model, v in r["coordinator_vs_best_mlserver"].items():
        lines.append(f"- {model}: coordinator peak {v['coordinator']} infer/s ({v['coordinator_at']}) vs best "
                     f"MLServer {v['best_mlserver']} ({v['best_mlserver_at']}): **×{v['ratio']}**")
    for model, v in r["coordinator_vs_edge_direct"].items():
        lines.append(f"- {model}: coordinator vs the same edge runtime called directly (peaks): ×{v['ratio']}")
    w = r["coordinator_wide_mlp_vs_inprocess_batch32"]
    lines.append(f"- wide_mlp: coordinator peak {w['coordinator_infer_per_s']} infer/s vs in-process ORT batch-32 "
                 f"{w['inprocess_b32_samples_per_s']} samples/s: "
                 f"**×{w['ratio']}**")
    i = r["wide_mlp_int8_vs_fp32_throughput"]
    lines.append("- wide_mlp INT8/FP32 throughput: " + ", ".join(f"{k} ×{v}" for k, v in i.items()))
    a = r["digits_int8_vs_fp32_accuracy"]
    lines.append(f"- digits accuracy (registry metadata): FP32 {a['fp32']}, FP16 {a['fp16']}, INT8 {a['int8']}; "
                 f"INT8/FP32 ×{a['ratio']} ({a['delta_points']} points)")
    return lines


def markdown(result: dict) -> str:
    meta = result["meta"]
    parts = ["# CNEI benchmark results", "",
             "\n".join(f"- {k}: {v}" for k, v in meta.items()), "",
             "## In-process ONNX Runtime (the physical limit)", "", inproc_table(result["inprocess"]), ""]
    for model in sorted({p["model"] for p in result["served"]}):
        parts += [f"## {model} over gRPC (perf_analyzer, batch-1 requests)", "",
                  "Throughput, infer/s:", "", pivot_table(result["served"], model), "",
                  served_table(result["served"], model), ""]
        cpu = cpu_table(result["served"], model)
        if cpu:
            parts += ["CPU per request, µs (`/proc` counters over each whole perf_analyzer run, warm-up "
                      "included; requests counted by the runtime):", "", cpu, ""]
    parts += ["## Ratios", ""] + ratio_lines(result["ratios"])
    errors = [p for p in result["served"] if p["error"]]
    if errors:
        parts += ["", "## Failed points", ""]
        parts += [f"- {p['config']} {p['model']} {p['precision']} c={p['concurrency']}: {p['error']}" for p in errors]
    return "\n".join(parts) + "\n"


def write(result: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path
