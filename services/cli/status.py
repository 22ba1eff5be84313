"""`cnei status`: nodes, models, deployments, latency, events and federated jobs of the mesh, from
the coordinator's /api/status, else from Redis and the registry directly."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from services.cli import train
from services.cli.models import models_list
from services.cli.output import table


def fetch_status(url: str, timeout: float = 3.0, headers: list[tuple[str, str]] | tuple = ()) -> dict | None:
    """The coordinator's /api/status, or None when it does not answer (HTTP, at least);
    `headers`: the keys of its restricted APIs (PermissionDenied, its reason, without them)."""
    import http.client
    import urllib.error
    import urllib.request

    from services.common.errors import PermissionDenied

    url = url.rstrip("/")
    url = url if "://" in url else f"http://{url}"  # host:port
    url = url if url.endswith("/api/status") else url + "/api/status"
    from services.common import tls

    ca, cert, key = tls.client_files()
    context = tls.client_ssl_context(ca, cert, key) if url.startswith("https:") and ca else None  # a coordinator on TLS
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers)), timeout=timeout,
                                    context=context) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 403:  # restricted: the coordinator answers, and says which header it needs
            raise PermissionDenied(f"coordinator at {url}: {_error_of(exc)}") from None
        return None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):  # a gRPC port, say
        return None


def _error_of(exc) -> str:
    """The `error` of an HTTP error's JSON body, else its reason."""
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}ms"


def _batching(b: dict) -> str:
    return f"{b['max_batch_size']}/{b['max_queue_delay_us']}us"


def status_text(s: dict) -> str:
    """The status page as terminal tables."""
    nodes = [[n["id"], n["tier"], n["region"], n["address"], n["health"], n["inflight"],
              f"{n['cpu_load']:.0%}", f"{n['mem_load']:.0%}", _ms(n["rtt_ms"]),
              "-" if n["heartbeat_age_s"] is None else f"{n['heartbeat_age_s']}s", ",".join(n["models"]) or "-"]
             for n in s["nodes"]]
    out = ["NODES", table(nodes, ["NODE", "TIER", "REGION", "ADDRESS", "HEALTH", "INFLIGHT", "CPU", "MEM",
                                  "RTT", "HEARTBEAT", "LOADED"]), "", "MODELS"]
    if s.get("models_error"):
        out.append(f"error: {s['models_error']}")
    variants = [[m["name"], v["version"], v["precision"], "-" if v["accuracy"] is None else v["accuracy"],
                 " ".join(f"{c}={ms}ms" for c, ms in v["latency_ms"].items()) or "-",
                 "serving" if m.get("in_service", True) else "unloaded"]
                for m in s["models"] for v in m["variants"]]
    out.append(table(variants, ["MODEL", "VERSION", "PRECISION", "ACCURACY", "LATENCY", "STATE"]))
    deployments = [[m["name"], d.get("rollout", "latest"), d["scheduler"], _batching(d["batching"]),
                    d["joint"], d["precision"], "+".join(d["tiers"]), "applied" if d["applied"] else "defaults"]
                   for m in s["models"] for d in [m["deployment"]] if not d.get("ensemble")]
    out += ["", "DEPLOYMENTS", table(deployments, ["MODEL", "SERVING", "SCHEDULER", "BATCH/DELAY", "JOINT",
                                                   "PRECISION", "TIERS", "SPEC"])]
    ensembles = [[m["name"], m["deployment"]["ensemble"]] for m in s["models"] if m["deployment"].get("ensemble")]
    if ensembles:
        out += ["", "ENSEMBLES", table(ensembles, ["MODEL", "STEPS"])]
    latency = [[r["model"], r["node"], r["samples"], _ms(r["p50_ms"]), _ms(r["p99_ms"])] for r in s["latency"]]
    out += ["", "LATENCY", table(latency, ["MODEL", "NODE", "SAMPLES", "P50", "P99"])]
    events = [[f"{e['age_s']}s ago", e["kind"], " ".join(f"{k}={v}" for k, v in e.items()
                                                       if k not in ("kind", "time", "age_s"))]
              for e in s["events"][:15]]
    out += ["", "RECENT FAILOVERS, ESCALATIONS AND NODE UP/DOWN", table(events, ["WHEN", "KIND", "DETAIL"]), "", "FEDERATED JOBS"]
    jobs = s["federated"]["jobs"]
    out.append(train.jobs_table(jobs) if jobs else f"none running ({s['federated']['note']})")
    return "\n".join(out)


async def status(args) -> int:
    from services.cli import clients

    snapshot = await asyncio.to_thread(fetch_status, args.url, 3.0, clients.headers(args))
    if snapshot is not None:
        print(status_text(snapshot))
        return 0
    print(f"coordinator not reachable at {args.url}; reading Redis and the registry directly", file=sys.stderr)
    return await status_direct(args)


async def status_direct(args) -> int:
    from redis.asyncio import Redis

    from services.common.nodes import NodeDirectory

    redis = Redis.from_url(args.redis, socket_timeout=2)
    try:
        nodes = await NodeDirectory(redis).live_nodes()
    finally:
        await redis.aclose()
    rows = [[n.node_id, n.tier, n.region, n.address, n.inflight, f"{time.time() - n.updated_at:.1f}s",
             ",".join(n.models) or "-"] for n in nodes]
    print("NODES")
    print(table(rows, ["NODE", "TIER", "REGION", "ADDRESS", "INFLIGHT", "HEARTBEAT", "LOADED"]))
    print()
    print("MODELS")
    return await models_list(argparse.Namespace(registry=args.registry, name="", header=args.header))



def add_parser(sub) -> argparse.ArgumentParser:
    st = sub.add_parser("status", help="nodes, models, latency and events of the mesh")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="coordinator REST base URL")
    st.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    st.add_argument("--registry", default="127.0.0.1:50051")
    return st
