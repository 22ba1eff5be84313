"""`make bench`: CNEI against in-process ONNX Runtime and Seldon MLServer, with perf_analyzer.

python bench/run.py [--quick] [--concurrency 1 4 ...] [--interval-ms 2000] [--runtimes 1|3]
Starts everything it measures (NATS, Redis, the mesh, MLServer) and stops it all on exit,
error or Ctrl-C; results go to bench/results/ (results.* for a full run, quick.* for --quick).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import cpu, inprocess, mlserver_setup, perf, report  # noqa: E402
from bench.harness import MODELS_DIR, log, run_meta, stop_on_sigterm  # noqa: E402
from bench.cnei_stack import CneiStack, free_ports  # noqa: E402
from services.models import digits, wide_mlp  # noqa: E402

WORK = REPO / ".bench" / "work"
CNEI_PLAN = [("digits", "FP32"), ("wide_mlp", "FP32"), ("wide_mlp", "INT8")]
MLSERVER_MODELS = ["digits", "wide_mlp"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one concurrency (4), 500 ms windows: a smoke run")
    p.add_argument("--concurrency", type=int, nargs="+", help="concurrency levels (default 1 4 8 16 32)")
    p.add_argument("--interval-ms", type=int, help="perf_analyzer measurement window (default 2000)")
    p.add_argument("--runtimes", type=int, choices=(1, 3), default=1,
                   help="edge runtimes left behind the coordinator (default 1: the one measured directly)")
    p.add_argument("--coordinator-workers", type=int, default=1,
                   help="coordinator processes sharing its port (default 1; 0: one per CPU)")
    p.add_argument("--front-door", choices=("on", "off"), default="on",
                   help="the coordinator's compiled gRPC front door (default on; off: Python gRPC serves)")
    p.add_argument("--runtime-threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads per runtime session (default 0: the runtime's default)")
    p.add_argument("--client", choices=sorted(perf.CLIENT_MODES), default="async",
                   help="perf_analyzer's closed loop: async (one thread, gRPC async API; default) or sync "
                        "(a blocking thread per open request, perf_analyzer's own default)")
    p.add_argument("--skip-mlserver", action="store_true", help="measure CNEI and in-process ORT only")
    p.add_argument("--node-tls", action="store_true",
                   help="the runtimes serve mutual TLS on their gRPC ports and fast lanes (a PKI made for the run): "
                        "what TLS between coordinator and nodes costs")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.concurrency = args.concurrency or ([4] if args.quick else [1, 4, 8, 16, 32])
    args.interval_ms = args.interval_ms or (500 if args.quick else 2000)
    args.inproc_seconds = 0.5 if args.quick else 2.0
    return args


def build_models() -> dict[str, list[digits.BuiltVariant]]:
    return {"digits": digits.build(MODELS_DIR), "wide_mlp": wide_mlp.build(MODELS_DIR)}


def onnx_file(models: dict, model: str, precision: str) -> Path:
    return next(v.path for v in models[model] if v.precision == precision)


def run_inprocess(models: dict, seconds: float) -> list[dict]:
    points = []
    for model, precision in [("digits", "FP32"), ("digits", "INT8")] + CNEI_PLAN[1:]:
        for batch in (1, 32):
            point = inprocess.measure(model, precision, onnx_file(models, model, precision), batch, seconds)
            log(f"in-process {model} {precision} b={batch}: {point.samples_per_s:.0f} samples/s, "
                f"p50 {point.p50_us:.0f} µs, p99 {point.p99_us:.0f} µs per call")
            points.append(point.as_dict())
    return points


def sweep(target: str, config: str, plan: list[tuple[str, str]], args, explicit_precision: bool,
          stack: CneiStack | None = None) -> list[dict]:
    """perf_analyzer at every concurrency; with a `stack`, also the CPU per request of the client
    and of each serving process (requests counted by the stack's runtimes)."""
    points = []
    book = cpu.CpuBook(stack.cpu_groups()) if stack is not None else None
    for model, precision in plan:
        for c in args.concurrency:
            params = {"precision": precision} if explicit_precision else None
            if book is not None:
                before = stack.served(model)
                book.start()
            tls = stack.node_tls if stack is not None and target == stack.edge else None  # the runtime, called directly
            p = perf.measure(target, model, precision, config, c, args.interval_ms, params, client=args.client, tls=tls)
            if book is not None and not p.error:
                rows, executions = (now - then for now, then in zip(stack.served(model), before))
                p = dataclasses.replace(p, cpu_us=book.per_request(rows),
                                        rows_per_execution=round(rows / executions, 2) if executions else 0.0)
            log(f"{config} {model} {precision} c={c}: " + (f"ERROR {p.error}" if p.error else
                f"{p.infer_per_s:.1f} infer/s, p50 {p.p50_us:.0f} µs, p99 {p.p99_us:.0f} µs"))
            points.append(p.as_dict())
    return points


def failed(config: str, plan: list[tuple[str, str]], args, error: str) -> list[dict]:
    return [perf.Point(m, prec, config, c, error=error).as_dict() for m, prec in plan for c in args.concurrency]


def run_cnei(models: dict, args, state: dict) -> tuple[list[dict], dict]:
    stack = state["cnei"] = CneiStack(WORK / "cnei", runtimes=args.runtimes,
                                      coordinator_workers=args.coordinator_workers, front_door=args.front_door,
                                      node_tls=args.node_tls)
    log(f"starting NATS, Redis and the mesh ({args.runtimes} runtime(s) behind the coordinator)")
    stack.start(models)
    stack.warm(CNEI_PLAN)
    points = sweep(stack.edge, report.EDGE, CNEI_PLAN, args, explicit_precision=True, stack=stack)
    points += sweep(stack.coordinator, report.COORDINATOR, CNEI_PLAN, args, explicit_precision=True, stack=stack)
    stack.stop()
    state["cnei"] = None
    return points, stack.registry_metadata


def run_mlserver(models: dict, args, state: dict) -> list[dict]:
    files = {m: onnx_file(models, m, "FP32") for m in MLSERVER_MODELS}
    plan = [(m, "FP32") for m in MLSERVER_MODELS]
    points = []
    for config in mlserver_setup.CONFIGS:
        ports = dict(zip(("http", "grpc", "metrics"), free_ports(3)))
        folder = mlserver_setup.write_repository(WORK / "mlserver", config, files, ports)
        server = state["mlserver"] = mlserver_setup.MLServerProcess(folder, WORK / f"{config.name}.log")
        try:
            log(f"starting {config.name} (parallel_workers={config.parallel_workers}, "
                f"adaptive batching={'on' if config.adaptive_batching else 'off'})")
            server.start(MLSERVER_MODELS)
            for model in MLSERVER_MODELS:
                perf.measure(server.target, model, "FP32", config.name, 1, 300)  # warm-up
            points += sweep(server.target, config.name, plan, args, explicit_precision=False)
        except Exception as exc:  # noqa: BLE001 - one broken config must not end the bench
            log(f"{config.name} failed: {exc} (log: {server.log_file})")
            points += failed(config.name, plan, args, str(exc))
        finally:
            server.stop()
            state["mlserver"] = None
    return points


def meta(args, started: float, load_at_start: float) -> dict:
    from services.common import settings as cfg
    from services.coordinator.workers import worker_count
    from services.edge_runtime.settings import PREFIX, RuntimeSettings

    rt = cfg.load(RuntimeSettings, PREFIX)
    mls = mlserver_setup.VENV / "lib"
    mls_version = next((p.name.removeprefix("mlserver-").removesuffix(".dist-info")
                        for p in mls.glob("python*/site-packages/mlserver-*.dist-info")), "")
    import onnxruntime

    return {
        **run_meta(args.quick, started, load_at_start),
        "onnxruntime": onnxruntime.__version__, "mlserver": mls_version,
        "perf_analyzer": f"-i grpc -b 1, {args.client} client "
                         f"({' '.join(perf.CLIENT_MODES[args.client]) or 'its defaults'}), "
                         f"{args.interval_ms} ms windows, 3 windows per point "
                         f"(-s {perf.STABILITY_PERCENT}), {perf.WARMUP_REQUESTS} warm-up requests",
        "concurrency": args.concurrency,
        "cnei": f"{args.runtimes} edge runtime(s) behind the coordinator "
                f"(front door {args.front_door}; "
                f"{1 if args.front_door == 'on' else worker_count(args.coordinator_workers)} coordinator process(es)); "
                f"runtime intra_op_threads="
                f"{rt.intra_op_threads if rt.intra_op_threads > 0 else 'chosen per model at load'}, "
                f"inference_workers={rt.inference_workers}; precision sent explicitly"
                f"{'; runtimes on mutual TLS (gRPC and fast lane)' if args.node_tls else ''}",
        "mlserver_setup": f"custom runtime bench/mlserver_runtime.py, ORT intra_op_threads="
                          f"{mlserver_setup.INTRA_OP_THREADS}, debug off; adaptive batching max_batch_size="
                          f"{mlserver_setup.BATCH_MAX_SIZE}, max_batch_time={mlserver_setup.BATCH_MAX_TIME_S}s",
        "inprocess": f"one ORT session, intra_op_threads={inprocess.INTRA_OP_THREADS}, "
                     f"{args.inproc_seconds}s per point",
    }


def stop_all(state: dict) -> None:
    for key in ("mlserver", "cnei"):
        if state.get(key) is not None:
            log(f"stopping {key}")
            state[key].stop()
            state[key] = None


def execute(args, state: dict) -> dict:
    started, load_at_start = time.time(), os.getloadavg()[0]
    if not Path(perf.binary()).exists():
        raise SystemExit(f"perf_analyzer not found at {perf.binary()}; run `make perf-analyzer`")
    if not args.skip_mlserver:
        mlserver_setup.python()  # fail early when the MLServer virtualenv is missing
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    log("building models (reused from .bench/models when present)")
    models = build_models()
    result = {"inprocess": run_inprocess(models, args.inproc_seconds), "served": []}
    served, registry = run_cnei(models, args, state)
    result["served"] += served
    if not args.skip_mlserver:
        result["served"] += run_mlserver(models, args, state)
    result["registry"] = registry
    result["ratios"] = report.ratios(result["served"], result["inprocess"], registry)
    result["meta"] = meta(args, started, load_at_start)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)  # no trace export while measuring
    if args.runtime_threads:
        os.environ["CNEI_RUNTIME_INTRA_OP_THREADS"] = str(args.runtime_threads)
    stop_on_sigterm()
    state: dict = {}
    try:
        result = execute(args, state)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        stop_all(state)
    json_path, md_path = report.write(result, args.out, "quick" if args.quick else "results")
    print(report.markdown(result))
    log(f"wrote {json_path} and {md_path}; logs in {WORK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
