"""`make bench-scheduler`: placement policies compared on an emulated heterogeneous cluster.

python bench/scheduler.py [--quick] [--rate 80] [--seconds 10] [--rounds 5] [--policies edgeai round_robin ...]
Four edge runtimes with different emulated CPU slowdowns and ingress delays and one cloud runtime
40 ms away serve wide_mlp FP32 behind one coordinator; every policy gets the same open-loop
Poisson arrivals on the same running cluster. Results: bench/results/scheduler.{md,json}
(quick.scheduler.* for --quick, git-ignored)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import loadgen, scheduler_report  # noqa: E402
from bench.harness import MODELS_DIR, SETTLE_S, log, run_meta, stop_on_sigterm  # noqa: E402
from bench.emulated_cluster import LAYOUT, EmulatedCluster, layout_rows, put_deployment  # noqa: E402
from services.common.deployment import DeploymentSpec, SchedulerSpec  # noqa: E402
from services.models import wide_mlp  # noqa: E402

WORK = REPO / ".bench" / "scheduler"


@dataclass(frozen=True)
class Config:
    """One row of the comparison: a label and the scheduler section of the deployment."""

    label: str
    scheduler: SchedulerSpec


CONFIGS = {
    "edgeai": Config("edgeai", SchedulerSpec(policy="edgeai")),
    "round_robin": Config("round_robin", SchedulerSpec(policy="round_robin")),
    "random": Config("random", SchedulerSpec(policy="random")),
    "least_loaded": Config("least_loaded", SchedulerSpec(policy="least_loaded")),
}


def parse_weights(text: str) -> Config:
    """`alpha,beta,gamma,delta[,threshold]` -> an edgeai row labelled with its weights."""
    values = [float(v) for v in text.split(",")]
    if len(values) not in (4, 5):
        raise argparse.ArgumentTypeError("weights are alpha,beta,gamma,delta[,threshold]")
    spec = SchedulerSpec(policy="edgeai", **dict(zip(("alpha", "beta", "gamma", "delta", "threshold"), values)))
    return Config(f"edgeai[{text}]", spec)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/scheduler.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one round of 6 s windows: under 2 minutes")
    p.add_argument("--rate", type=float, default=80.0, help="Poisson arrivals per second (default 80)")
    p.add_argument("--seconds", type=float, help="measured window per policy and round (default 10, quick 6)")
    p.add_argument("--warmup", type=float, default=4.0,
                   help=f"load after switching policy, not measured (default 4, at least {SETTLE_S})")
    p.add_argument("--rounds", type=int, help="passes over every policy, interleaved (default 5, quick 1)")
    p.add_argument("--timeout", type=float, default=2.0, help="per-request deadline in seconds (default 2)")
    p.add_argument("--policies", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--edgeai-weights", type=parse_weights, nargs="*", default=[], metavar="A,B,G,D[,T]",
                   help="extra edgeai rows with these weights (and threshold)")
    p.add_argument("--region", default="", help="request parameter 'region' (default: none)")
    p.add_argument("--no-fast-lane", dest="fast_lane", action="store_false",
                   help="coordinator -> runtime over gRPC instead of the internal TCP data plane")
    p.add_argument("--seed", type=int, default=1, help="seed of the arrival times (same for every policy)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (6.0 if args.quick else 10.0)
    args.warmup = max(args.warmup, SETTLE_S)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.configs = [CONFIGS[name] for name in args.policies] + list(args.edgeai_weights)
    return args


async def coordinator_view(url: str) -> dict:
    """The coordinator's RTT estimate per node (what edgeai's network score reads)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as reply:
            status = await reply.json()
    return {n["id"]: n["rtt_ms"] for n in status["nodes"]}


async def measure(cluster: EmulatedCluster, config: Config, args, seed: int) -> dict:
    """Apply the policy, then warm-up (which covers the deployment cache's settling) and window
    of open-loop load; the compute time each runtime spent inside the window gives its busy
    fraction."""
    await put_deployment(cluster.registry, DeploymentSpec(model=wide_mlp.NAME, scheduler=config.scheduler))
    addresses = {n.node_id: cluster.node_address(n.node_id) for n in cluster.layout}
    params = {"region": args.region} if args.region else {}
    load = asyncio.ensure_future(loadgen.run_open_loop(
        cluster.coordinator, wide_mlp.NAME, args.rate, args.warmup + args.seconds, args.timeout, seed, params))
    await asyncio.sleep(args.warmup)
    before, t0 = await loadgen.compute_snapshot(addresses, wide_mlp.NAME), time.perf_counter()
    await asyncio.sleep(args.seconds)
    after, t1 = await loadgen.compute_snapshot(addresses, wide_mlp.NAME), time.perf_counter()
    samples = [s for s in await load if s.due_s >= args.warmup]
    rtt = await coordinator_view(cluster.status_url)
    busy = {n: (after[n] - before[n]) / 1e9 / (t1 - t0) for n in addresses}
    return {"samples": samples, "busy": busy, "rtt_ms": rtt, "load_average": os.getloadavg()[0]}


def merge(config: Config, runs: list[dict], args) -> dict:
    """One row from every round of one policy: pooled samples, mean busy fractions."""
    samples = [s for r in runs for s in r["samples"]]
    row = loadgen.summarise(samples, args.seconds * len(runs), args.timeout)
    nodes = runs[0]["busy"].keys()
    row["busy"] = {n: sum(r["busy"][n] for r in runs) / len(runs) for n in nodes}
    row["rtt_ms"] = runs[-1]["rtt_ms"]
    row["rounds_p99_ms"] = [loadgen.summarise(r["samples"], args.seconds, args.timeout)["p99_ms"] for r in runs]
    row["median_round_p99_ms"] = statistics.median(row["rounds_p99_ms"])
    row["rounds_load_average"] = [round(r["load_average"], 2) for r in runs]
    return {"label": config.label, "scheduler": asdict(config.scheduler), **row}


async def run_all(cluster: EmulatedCluster, args) -> list[dict]:
    runs: dict[str, list[dict]] = {c.label: [] for c in args.configs}
    for round_no in range(args.rounds):
        order = args.configs if round_no % 2 == 0 else list(reversed(args.configs))
        for config in order:
            run = await measure(cluster, config, args, args.seed + round_no)
            part = loadgen.summarise(run["samples"], args.seconds, args.timeout)
            log(f"round {round_no + 1} {config.label}: p50 {part['p50_ms']:.1f} ms, p99 {part['p99_ms']:.1f} ms, "
                f"success {part['success_rate']:.2%}, share " +
                " ".join(f"{n}={v:.0%}" for n, v in part["node_share"].items()))
            runs[config.label].append(run)
    return [merge(c, runs[c.label], args) for c in args.configs]


def meta(args, started: float, load_at_start: float) -> dict:
    return {
        **run_meta(args.quick, started, load_at_start),
        "model": f"{wide_mlp.NAME} FP32 ({'-'.join(map(str, wide_mlp.LAYERS))}), batch-1 requests",
        "load": f"open-loop Poisson, {args.rate:g} req/s, {args.warmup:g} s warm-up + {args.seconds:g} s "
                f"window per policy, {args.rounds} round(s) interleaved (arrival seed {args.seed}+round), "
                f"timeout {args.timeout:g} s" + (f", region={args.region}" if args.region else ", no region"),
        "layout": layout_rows(LAYOUT),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    started, load_at_start = time.time(), os.getloadavg()[0]
    shutil.rmtree(WORK, ignore_errors=True)
    cluster = EmulatedCluster(WORK, fast_lane=args.fast_lane)
    try:
        log("building wide_mlp (reused from .bench/models when present)")
        variants = wide_mlp.build(MODELS_DIR)
        log("starting NATS, Redis, registry, " + ", ".join(
            f"{n.node_id} (x{n.slowdown:g}, {n.delay_ms:g} ms)" for n in LAYOUT) + " and the coordinator")
        cluster.start(wide_mlp.NAME, variants)
        rows = asyncio.run(run_all(cluster, args))
        if cluster.dead():
            log(f"processes exited during the run: {cluster.dead()} (logs in {WORK / 'logs'})")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        cluster.stop()
    result = {"rows": rows, "verdict": scheduler_report.verdict(rows),
              "delay_not_applied": scheduler_report.delay_not_applied(rows, layout_rows(LAYOUT)),
              "meta": meta(args, started, load_at_start)}
    name = "quick.scheduler" if args.quick else "scheduler"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = scheduler_report.markdown(result)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
