"""`make bench-batching`: does dynamic batching keep the tail bounded under open-loop Poisson load?

python bench/batching.py [--quick] [--model wide_mlp] [--rates 50 200 400 700] [--interval-ms 3000]
One edge runtime behind the coordinator (front door on), batch-1 requests from perf_analyzer at
open-loop Poisson arrivals (`--request-distribution poisson --async`). For every batching set-up of
the model's deployment and every rate it reports p50/p99, the batches the runtime actually ran
(from its Triton statistics) and how far p99 lies above the model's compute time for the batch
sizes it ran plus max_queue_delay_us. Results: bench/results/batching.{md,json}
(quick.batching.* for --quick, git-ignored)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import mlserver_setup, perf  # noqa: E402
from bench.harness import MODELS_DIR, SETTLE_S, log, run_meta, stop_on_sigterm  # noqa: E402
from bench.cnei_stack import CneiStack, free_ports  # noqa: E402
from bench.emulated_cluster import put_deployment  # noqa: E402
from services.common.deployment import BatchingSpec, DeploymentSpec  # noqa: E402
from services.models import digits, wide_mlp  # noqa: E402
from services.pb.inference import grpc_service_pb2 as pb  # noqa: E402
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

WORK = REPO / ".bench" / "batching"
BUILDERS = {"wide_mlp": wide_mlp.build, "digits": digits.build}
DEFAULT_RATES = {"wide_mlp": [50.0, 200.0, 400.0, 700.0], "digits": [50.0, 400.0, 1000.0, 2000.0]}


@dataclass(frozen=True)
class Setup:
    """One row group: a label and the deployment's batching section."""

    label: str
    batching: BatchingSpec


SETUPS = [
    Setup("unbatched", BatchingSpec(max_batch_size=1)),
    Setup("greedy", BatchingSpec()),  # the defaults: no added delay, batch what queued while the node was busy
    Setup("delay-500us", BatchingSpec(max_queue_delay_us=500)),
    Setup("delay-2ms", BatchingSpec(max_queue_delay_us=2000)),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/batching.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the lowest and the third rate, 1 s windows: a smoke run")
    p.add_argument("--model", choices=sorted(BUILDERS), default="wide_mlp")
    p.add_argument("--rates", type=float, nargs="+", help="Poisson arrival rates, req/s (default per model)")
    p.add_argument("--interval-ms", type=int, help="perf_analyzer window; three per point (default 3000)")
    p.add_argument("--setups", nargs="+", choices=[s.label for s in SETUPS], help="batching set-ups (default all)")
    p.add_argument("--skip-mlserver", action="store_true",
                   help="leave out MLServer with and without adaptive batching (measured when its "
                        "virtualenv from `make bench` exists)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    args = p.parse_args(argv)
    rates = DEFAULT_RATES[args.model]
    args.rates = args.rates or ([rates[0], rates[2]] if args.quick else rates)
    args.interval_ms = args.interval_ms or (1000 if args.quick else 3000)
    args.setups = [s for s in SETUPS if not args.setups or s.label in args.setups]
    args.out = args.out.resolve()
    return args


# ---- the maths (pure) -------------------------------------------------------------------------

def batch_delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Per batch size: (executions, compute ns) run between two statistics snapshots."""
    out = {}
    for size, (count, ns) in after.items():
        c0, n0 = before.get(size, (0, 0))
        if count > c0:
            out[size] = (count - c0, ns - n0)
    return out


def request_percentile_batch(batches: dict[int, tuple[int, int]], q: float) -> int:
    """The batch size that the q-th percentile request ran in (requests, not executions: a batch
    of 8 holds 8 requests)."""
    sizes = sorted(batches)
    total = sum(size * batches[size][0] for size in sizes)
    seen = 0
    for size in sizes:
        seen += size * batches[size][0]
        if seen >= q / 100.0 * total:
            return size
    return sizes[-1] if sizes else 0


def compute_ms(batches: dict[int, tuple[int, int]], size: int) -> float | None:
    """Mean ONNX Runtime time of one batch of `size` (the largest size run at or below it when
    that exact size was not run)."""
    known = [s for s in batches if s <= size] or list(batches)
    if not known:
        return None
    count, ns = batches[max(known)]
    return ns / count / 1e6


def row(setup: Setup, rate: float, point: perf.Point, batches: dict) -> dict:
    """One point: perf_analyzer's latencies, the batches the runtime ran, p99 against compute +
    queue delay."""
    executions = sum(c for c, _ in batches.values())
    requests = sum(size * c for size, (c, _) in batches.items())
    p99_batch = request_percentile_batch(batches, 99) if batches else 0
    compute = compute_ms(batches, p99_batch)
    delay_ms = setup.batching.max_queue_delay_us / 1000.0
    p99_ms = point.p99_us / 1000.0 if not point.error else None
    bound = None if compute is None else compute + delay_ms
    return {
        "setup": setup.label, "batching": asdict(setup.batching), "rate": rate, "error": point.error,
        "infer_per_s": point.infer_per_s, "p50_ms": point.p50_us / 1000.0 if not point.error else None,
        "p99_ms": p99_ms, "executions": executions, "mean_batch": requests / executions if executions else None,
        "p99_batch": p99_batch, "compute_ms_at_p99_batch": compute, "delay_ms": delay_ms, "bound_ms": bound,
        "excess_ms": None if bound is None or p99_ms is None else p99_ms - bound,
        "batch_sizes": {str(s): c for s, (c, _) in sorted(batches.items())},
    }


def spikes(rows: list[dict], slack_ms: float) -> dict:
    """The serving constant, measured: p99 minus compute of the unbatched set-up at the lowest rate
    (no queueing to speak of). A batched point 'spikes' when its p99 lies more than that constant
    plus `slack_ms` above its compute + max_queue_delay."""
    base = [r for r in rows if r["setup"] == "unbatched" and r["excess_ms"] is not None]
    if not base:
        return {}
    constant = min(base, key=lambda r: r["rate"])["excess_ms"]
    limit = constant + slack_ms
    batched = [r for r in rows if r["setup"] != "unbatched" and r["excess_ms"] is not None]
    return {"constant_ms": constant, "slack_ms": slack_ms, "limit_ms": limit,
            "within": [f"{r['setup']}@{r['rate']:g}" for r in batched if r["excess_ms"] <= limit],
            "spiked": [f"{r['setup']}@{r['rate']:g}" for r in batched if r["excess_ms"] > limit]}


# ---- measuring ----------------------------------------------------------------------------------

async def batch_stats(address: str, model: str) -> dict[int, tuple[int, int]]:
    """The runtime's Triton batch statistics: {batch size: (executions, compute ns)}."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=5.0)
    out: dict[int, tuple[int, int]] = {}
    for s in reply.model_stats:
        for b in s.batch_stats:
            c, n = out.get(b.batch_size, (0, 0))
            out[b.batch_size] = (c + b.compute_infer.count, n + b.compute_infer.ns)
    return out


def measure(stack: CneiStack, setup: Setup, rate: float, args) -> dict:
    asyncio.run(put_deployment(f"127.0.0.1:{stack.settings.registry_port}",
                               DeploymentSpec(model=args.model, batching=setup.batching)))
    time.sleep(SETTLE_S)
    before = asyncio.run(batch_stats(stack.edge, args.model))
    point = perf.measure(stack.coordinator, args.model, "FP32", setup.label, 0, args.interval_ms,
                         {"precision": "FP32"}, poisson_rate=rate)
    after = asyncio.run(batch_stats(stack.edge, args.model))
    # The statistics cover perf_analyzer's warm-up requests too (same rate, same set-up).
    result = row(setup, rate, point, batch_delta(before, after))
    result["load_average"] = round(os.getloadavg()[0], 2)
    return result


def run_all(stack: CneiStack, args) -> list[dict]:
    rows = []
    for rate in args.rates:
        for setup in args.setups:
            r = measure(stack, setup, rate, args)
            if r["error"]:
                log(f"{setup.label} @ {rate:g} req/s: ERROR {r['error']}")
            else:
                log(f"{setup.label} @ {rate:g} req/s: {r['infer_per_s']:.0f} infer/s, p50 {r['p50_ms']:.2f} ms, "
                    f"p99 {r['p99_ms']:.2f} ms, mean batch {r['mean_batch'] or 0:.1f}, p99 batch {r['p99_batch']}, "
                    f"compute {r['compute_ms_at_p99_batch'] or 0:.2f} ms, excess {r['excess_ms'] or 0:.2f} ms")
            rows.append(r)
    return rows


MLSERVER_CONFIGS = [c for c in mlserver_setup.CONFIGS if c.parallel_workers == 0]  # w0 and w0-ab


def mlserver_row(config: mlserver_setup.MLServerConfig, rate: float, point: perf.Point) -> dict:
    """An MLServer point: latencies only (it keeps no Triton batch statistics)."""
    return {"setup": config.name, "batching": {"adaptive_batching": config.adaptive_batching,
                                               "max_batch_size": mlserver_setup.BATCH_MAX_SIZE,
                                               "max_batch_time_s": mlserver_setup.BATCH_MAX_TIME_S}
            if config.adaptive_batching else {}, "rate": rate, "error": point.error,
            "infer_per_s": point.infer_per_s, "p50_ms": None if point.error else point.p50_us / 1000.0,
            "p99_ms": None if point.error else point.p99_us / 1000.0, "executions": None, "mean_batch": None,
            "p99_batch": None, "compute_ms_at_p99_batch": None,
            "delay_ms": mlserver_setup.BATCH_MAX_TIME_S * 1000.0 if config.adaptive_batching else 0.0,
            "bound_ms": None, "excess_ms": None, "batch_sizes": {}}


def run_mlserver(onnx: Path, args) -> list[dict]:
    """The same Poisson load against MLServer 1.7 serving the same ONNX file, without and with its
    adaptive batching (parallel_workers 0, its best set-up in `make bench`)."""
    rows = []
    for config in MLSERVER_CONFIGS:
        ports = dict(zip(("http", "grpc", "metrics"), free_ports(3)))
        folder = mlserver_setup.write_repository(WORK / "mlserver", config, {args.model: onnx}, ports)
        server = mlserver_setup.MLServerProcess(folder, WORK / f"{config.name}.log")
        try:
            log(f"starting {config.name}")
            server.start([args.model])
            perf.measure(server.target, args.model, "FP32", config.name, 1, 300)  # warm-up
            for rate in args.rates:
                point = perf.measure(server.target, args.model, "FP32", config.name, 0, args.interval_ms,
                                     poisson_rate=rate)
                r = mlserver_row(config, rate, point)
                log(f"{config.name} @ {rate:g} req/s: " + (f"ERROR {r['error']}" if r["error"] else
                    f"{r['infer_per_s']:.0f} infer/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"))
                rows.append(r)
        except Exception as exc:  # noqa: BLE001 - a broken set-up must not end the bench
            log(f"{config.name} failed: {exc} (log: {server.log_file})")
        finally:
            server.stop()
    return rows


# ---- report -------------------------------------------------------------------------------------

def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Dynamic batching under open-loop Poisson load", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "CNEI set-ups are the model's deployment behind the coordinator; `mlserver-*` rows are "
                  "MLServer 1.7 serving the same file (`-ab`: adaptive batching, max_batch_size "
                  f"{mlserver_setup.BATCH_MAX_SIZE}, max_batch_time {mlserver_setup.BATCH_MAX_TIME_S * 1000:g} ms; "
                  "no batch statistics)."]
    lines += ["", "| rate req/s | set-up | infer/s | p50 ms | p99 ms | mean batch | p99 batch | compute ms | "
              "queue delay ms | p99 − (compute + delay) ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['rate']:g} | {r['setup']} | {r['infer_per_s']:.0f} | {_fmt(r['p50_ms'])} | "
                     f"{_fmt(r['p99_ms'])} | {_fmt(r['mean_batch'], 1)} | {_fmt(r['p99_batch'], 0)} | "
                     f"{_fmt(r['compute_ms_at_p99_batch'])} | {_fmt(r['delay_ms'])} | {_fmt(r['excess_ms'])} |"
                     + (f" error: {r['error']}" if r["error"] else ""))
    verdict = result["verdict"]
    if verdict:
        lines += ["", f"Serving constant (unbatched p99 − compute at the lowest rate): "
                      f"{verdict['constant_ms']:.2f} ms; a batched point is within bounds when "
                      f"p99 − (compute + delay) ≤ {verdict['limit_ms']:.2f} ms (constant + "
                      f"{verdict['slack_ms']:g} ms).",
                  f"- within: {', '.join(verdict['within']) or 'none'}",
                  f"- above: {', '.join(verdict['spiked']) or 'none'}"]
    lines += ["", "compute ms: the runtime's mean ONNX Runtime time for one batch of the size that the "
                  "99th-percentile request ran in (its Triton `batch_stats` over the window)."]
    return "\n".join(lines) + "\n"


def meta(args, started: float, load_at_start: float) -> dict:
    return {
        **run_meta(args.quick, started, load_at_start),
        "model": f"{args.model} FP32, batch-1 requests (precision sent explicitly)",
        "load": f"perf_analyzer -i grpc --request-distribution poisson --async at "
                f"{', '.join(f'{r:g}' for r in args.rates)} req/s, {perf.WARMUP_REQUESTS} warm-up requests, "
                f"three {args.interval_ms} ms windows per point",
        "mesh": "one edge runtime behind the coordinator (front door on, one coordinator process)",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)  # no trace export while measuring
    stop_on_sigterm()
    started, load_at_start = time.time(), os.getloadavg()[0]
    shutil.rmtree(WORK, ignore_errors=True)
    stack = CneiStack(WORK)
    try:
        log(f"building {args.model} (reused from .bench/models when present)")
        models = {args.model: BUILDERS[args.model](MODELS_DIR)}
        log("starting NATS, Redis and the mesh (one edge runtime behind the coordinator)")
        stack.start(models)
        stack.warm([(args.model, "FP32")])
        rows = run_all(stack, args)
        stack.stop()
        if not args.skip_mlserver:
            if mlserver_setup.VENV.joinpath("bin", "python").exists():
                onnx = next(v.path for v in models[args.model] if v.precision == "FP32")
                rows += run_mlserver(onnx, args)
            else:
                log(f"MLServer left out: {mlserver_setup.VENV} not found ({mlserver_setup.INSTALL_HINT})")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        stack.stop()
    result = {"rows": rows, "verdict": spikes(rows, slack_ms=1.0), "meta": meta(args, started, load_at_start)}
    name = "quick.batching" if args.quick else "batching"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
