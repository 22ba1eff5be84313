"""Status page data: one JSON-ready snapshot of the mesh as the coordinator sees it."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Mapping, Sequence

from services.common import model_metadata
from services.common.deployment import DeploymentSpec, PrecisionSpec
from services.common.model_spec import ModelVariant, version_key
from services.common.nodes import NodeInfo
from services.common.served import steps_run
from services.coordinator.breaker import Breaker
from services.coordinator.latency import LatencyBook
from services.coordinator.precision import accuracy

REGISTRY_TIMEOUT_S = 3.0
JOBS_TIMEOUT_S = 1.0
MAX_JOBS = 20
LATENCY_PREFIX = model_metadata.LATENCY_PREFIX
MAX_EVENTS = 50


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def breaker_state(breaker: Breaker | None) -> str:
    """closed | open | half-open (a node with no breaker yet counts as closed)."""
    return "closed" if breaker is None else breaker.state.value.replace("_", "-")


def node_health(node_id: str, unhealthy: Collection[str], breaker: Breaker | None) -> str:
    """unhealthy (failed health check) | open | half-open (breaker) | live."""
    if node_id in unhealthy:
        return "unhealthy"
    state = breaker_state(breaker)
    return "live" if state == "closed" else state


def model_breaker_rows(faults: Mapping[str, Breaker]) -> list[dict]:
    """The node's breakers of its models that failed there (`Breakers.faults`), by model."""
    return [{"model": model, "breaker": breaker_state(b), "failures": b.failures, "reason": b.reason}
            for model, b in sorted(faults.items())]


def node_row(node: NodeInfo, rtt_ms: float | None, unhealthy: Collection[str], breaker: Breaker | None,
             outstanding: int, now: float, faults: Mapping[str, Breaker] | None = None) -> dict:
    """`faults`: the node's breakers of its models that failed there (a model out of use on the
    node leaves its other models served: `health` and `breaker` are the node's own)."""
    return {
        "id": node.node_id, "tier": node.tier, "region": node.region, "address": node.address,
        "node_class": node.node_class or node.tier, "health": node_health(node.node_id, unhealthy, breaker),
        "breaker": breaker_state(breaker), "inflight": node.inflight, "outstanding": outstanding,
        "cpu_load": _round(node.cpu_load, 3), "mem_load": _round(node.mem_load, 3),
        "cpus": node.cpus, "cache_bytes": node.cache_bytes, "models": sorted(node.models),
        "heartbeat_age_s": _round(max(0.0, now - node.updated_at), 1) if node.updated_at else None,
        "rtt_ms": _round(rtt_ms, 3), "model_breakers": model_breaker_rows(faults or {}),
    }


def variant_latencies(variant: ModelVariant) -> dict[str, float]:
    """Measured batch-1 latency per node class, from `latency_ms.<class>` metadata."""
    read = {key[len(LATENCY_PREFIX):]: model_metadata.value(variant.metadata, key, variant.key)
            for key in variant.metadata if key.startswith(LATENCY_PREFIX)}
    return {node_class: round(value, 3) for node_class, value in sorted(read.items()) if value is not None}


def variant_row(variant: ModelVariant) -> dict:
    return {"version": variant.version, "precision": variant.precision, "accuracy": accuracy(variant),
            "size_bytes": variant.size_bytes, "sha256": variant.sha256[:12],
            "latency_ms": variant_latencies(variant)}


def precision_text(p: PrecisionSpec) -> str:
    """A deployment's precision policy as choose_variant applies it: the pinned precision ('INT8'),
    else its accuracy floor and latency budget ('floor≥0.95', '≤2ms', both), else 'auto'."""
    if p.precision:
        return p.precision
    parts = ([f"floor≥{p.accuracy_floor:g}"] if p.accuracy_floor is not None else []) + \
            ([f"≤{p.latency_budget_ms:g}ms"] if p.latency_budget_ms is not None else [])
    return " ".join(parts) or "auto"


def ensemble_text(spec: DeploymentSpec, versions: Sequence[str] = ()) -> str | None:
    """An ensemble's steps ('digits:1@edge -> tiny'): each step's model, the version it runs where
    known (`versions`, per step; '' unknown) and its tier; None for a model's own deployment."""
    versions = list(versions) or [""] * len(spec.ensemble)
    return " -> ".join(s.model + (f":{v}" if v else "") + (f"@{s.tier}" if s.tier else "")
                       for s, v in zip(spec.ensemble, versions)) or None


def deployment_summary(spec: DeploymentSpec, applied: bool, step_versions: Sequence[str] = ()) -> dict:
    b, j = spec.batching, spec.joint
    return {
        "applied": applied, "scheduler": spec.scheduler.policy, "tiers": list(spec.tiers),
        "cloud_fallback": spec.cloud_fallback,
        "batching": {"max_batch_size": b.max_batch_size, "max_queue_delay_us": b.max_queue_delay_us,
                     "preferred_batch_sizes": list(b.preferred_batch_sizes)},
        "precision": precision_text(spec.precision), "joint": j.mode,
        "joint_threshold": j.threshold if j.mode != "off" else None,
        "hedge_after_ms": spec.hedge_after_ms, "response_cache": spec.response_cache,
        "ensemble": ensemble_text(spec, step_versions),
        "rollout": rollout_text(spec),
    }


def rollout_text(spec: DeploymentSpec) -> str:
    """Which version requests that name none get: 'latest', 'v1', 'v1 + v2 canary 10 %'."""
    r = spec.rollout
    stable = f"v{r.stable}" if r.stable else "latest"
    return f"{stable} + v{r.canary} canary {r.canary_percent:g} %" if r.canary else stable


def model_rows(variants: Iterable[ModelVariant], deployments: Mapping[str, DeploymentSpec],
               unloaded: frozenset[str] = frozenset()) -> list[dict]:
    """One entry per model name: its variants (newest version first), its deployment and whether it
    is in service (not unloaded through the repository API)."""
    by_name: dict[str, list[ModelVariant]] = {}
    for v in variants:
        by_name.setdefault(v.name, []).append(v)
    rows = []
    for name in sorted(by_name):
        ordered = sorted(by_name[name], key=lambda v: (version_key(v.version), v.precision), reverse=True)
        spec = deployments.get(name)
        rows.append({
            "name": name, "latest_version": ordered[0].version, "in_service": name not in unloaded,
            "variants": [variant_row(v) for v in ordered],
            "deployment": deployment_summary(spec or DeploymentSpec(model=name), spec is not None),
        })
    for name in sorted(set(deployments) - set(by_name)):  # ensembles: a deployment, no artifact
        spec = deployments[name]
        if spec.ensemble:
            versions = steps_run(spec, by_name, deployments)
            rows.append({"name": name, "latest_version": "1", "in_service": name not in unloaded, "variants": [],
                         "deployment": deployment_summary(spec, True, versions)})
    return rows


def latency_rows(book: LatencyBook) -> list[dict]:
    """Live p50/p99 per (model, node) over the rolling window the coordinator keeps."""
    rows = []
    for key in sorted(book.windows):
        window = book.windows[key]
        if not window.samples:
            continue
        p50, p99 = window.quantile(0.5), window.quantile(0.99)
        rows.append({"model": key[0], "node": key[1] if len(key) > 1 else "", "samples": len(window.samples),
                     "p50_ms": _round(p50 * 1e3, 3), "p99_ms": _round(p99 * 1e3, 3)})
    return rows


def event_rows(recent: Iterable[dict], now: float, limit: int = MAX_EVENTS) -> list[dict]:
    """Newest first, each with its age; other keys kept as the core recorded them."""
    newest = sorted(recent, key=lambda e: e.get("time", 0.0), reverse=True)[:limit]
    return [{**e, "age_s": _round(max(0.0, now - e.get("time", now)), 1)} for e in newest]


def stats_rows(stats) -> list[dict]:
    return [{"model": s.name, "version": s.version, "success": s.success.count, "fail": s.fail.count,
             "inferences": s.inference_count,
             "mean_ms": _round(s.success.ns / s.success.count / 1e6, 3) if s.success.count else None}
            for s in stats.select()]


async def registry_view(registry) -> tuple[list[ModelVariant], dict[str, DeploymentSpec]]:
    variants, deployments = await asyncio.wait_for(
        asyncio.gather(registry.list(), registry.list_deployments()), REGISTRY_TIMEOUT_S)
    return variants, {d.model: d for d in deployments}


async def federated_view(jobs) -> dict:
    """Recent federated jobs from Redis, newest first; a Redis failure becomes the note."""
    if jobs is None:
        return {"jobs": [], "note": "no trainer is connected to this coordinator"}
    try:
        records = await asyncio.wait_for(jobs.list(MAX_JOBS), JOBS_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - the page still shows everything else
        return {"jobs": [], "note": f"job records unavailable: {getattr(exc, 'message', None) or exc!r}"}
    return {"jobs": [r.summary() for r in records], "note": "no job has been started"}


async def build_status(core, jobs=None) -> dict:
    """The whole snapshot; a registry failure becomes `models_error`, never an exception."""
    now = time.time()
    view = core.nodes
    outstanding = core.rows_outstanding()  # as placement weighs them: the front door's rows too
    status = {
        "server": {"name": core.server_name, "version": core.server_version, "time": now},
        "nodes": [node_row(n, view.rtt_ms.get(n.node_id), view.unhealthy, core.breakers.by_node.get(n.node_id),
                           outstanding.get(n.node_id, 0), now, core.breakers.faults(n.node_id))
                  for n in sorted(view.nodes, key=lambda n: (n.tier, n.node_id))],
        "latency": latency_rows(core.latency),
        "events": event_rows(list(core.recent), now),
        "stats": stats_rows(core.stats_view),  # every worker's, added up (StatsShare)
        "federated": await federated_view(jobs),
        "models": [],
        "models_error": None,
        "registry": core.catalog.outage.summary(),  # as the catalog's reads find it
    }
    try:
        variants, deployments = await registry_view(core.catalog.registry)
        status["models"] = model_rows(variants, deployments, await core.unloaded_models())
    except Exception as exc:  # noqa: BLE001 - the page still shows nodes and events
        status["models_error"] = f"registry unavailable: {getattr(exc, 'message', None) or exc!r}"
    return status
