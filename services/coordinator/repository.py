"""Triton's explicit model control over the mesh (RepositoryModelLoad / RepositoryModelUnload).

The registry is the model repository and every registered model is served by default (nodes pull
a variant when a request first needs it). Unloading a model takes it out of service everywhere:
it is recorded in Redis (shared by every coordinator and worker, surviving restarts), announced
on NATS, and dropped from the nodes' memory; requests for it then fail with UNAVAILABLE, ModelReady
is false and the repository index lists it UNAVAILABLE. Loading it puts it back in service and
warms it: the variant placement would pick by default is loaded on every eligible node, so the
first requests do not wait for a pull."""
from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common import events
from services.common.errors import CneiError, ModelNotFound, Unavailable
from services.common.node_control import NodeControlClients

log = logging.getLogger(__name__)
UNLOADED_KEY = "cnei:models:unloaded"  # Redis set: names of the models taken out of service


class ModelControl:
    def __init__(self, core, redis: Redis, clients: NodeControlClients, ttl_s: float, node_timeout_s: float = 60.0):
        self.core = core
        self.redis = redis
        self.clients = clients
        self.ttl_s = ttl_s
        self.node_timeout_s = node_timeout_s
        self._unloaded: frozenset[str] = frozenset()
        self._expires = 0.0

    async def unloaded(self) -> frozenset[str]:
        """Models out of service (read again after `ttl_s`, or at once after `forget`)."""
        if time.monotonic() >= self._expires:
            try:
                members = await self.redis.smembers(UNLOADED_KEY)
            except (RedisError, OSError) as exc:  # Redis away: serve by the last set known
                log.warning("unloaded models not read (%s): the last known ones stay in force", exc)
            else:
                self._unloaded = frozenset(m.decode() if isinstance(m, bytes) else m for m in members)
            self._expires = time.monotonic() + self.ttl_s
        return self._unloaded

    async def check(self, model: str) -> None:
        """Raise UNAVAILABLE when `model` was unloaded."""
        if model in await self.unloaded():
            raise Unavailable(f"model '{model}' is unloaded (RepositoryModelUnload); RepositoryModelLoad "
                              f"serves it again")

    def forget(self) -> None:
        self._expires = 0.0

    async def load(self, model: str) -> list[str]:
        """Put `model` back in service and load its default variant on every eligible node: the
        ids of the nodes that hold it now. UNAVAILABLE when there are nodes but none could load it."""
        variant = await self.core.model_variant(model)  # NOT_FOUND for a model the registry lacks
        await self.redis.srem(UNLOADED_KEY, model)
        self.forget()
        await self.core.announce(events.MODEL_LOADED, {"model": model, "version": variant.version})
        return await self.warm(variant)

    async def warm(self, variant) -> list[str]:
        """Load `variant` on every eligible node of its model's deployment (a model loaded again,
        a canary pushed to the edges before its traffic): the ids of the nodes that hold it now.
        UNAVAILABLE when there are nodes but none could load it."""
        model = variant.name
        nodes = self.core.eligible_nodes(await self.core.catalog.deployment(model))
        results = await asyncio.gather(*(self.clients.load(n.address, variant.name, variant.version, variant.precision,
                                                           self.node_timeout_s) for n in nodes),
                                       return_exceptions=True)
        loaded, failures = [], []
        for node, result in zip(nodes, results):
            if isinstance(result, BaseException):
                if not isinstance(result, CneiError):
                    raise result
                failures.append(f"{node.node_id}: {result.message}")
            else:
                loaded.append(node.node_id)
        if failures:
            log.warning("model %s: not loaded on %s", model, "; ".join(failures))
        if nodes and not loaded:
            raise Unavailable(f"model '{model}' could not be loaded on any node ({'; '.join(failures)})")
        log.info("model %s v%s %s loaded on %s", model, variant.version, variant.precision, ",".join(loaded) or "no node")
        return loaded

    async def unload(self, model: str) -> list[str]:
        """Take `model` out of service and out of every node's memory: the nodes it was dropped from."""
        variants = await self.core.catalog.all_variants(model)
        if not variants:
            raise ModelNotFound(model, "")
        await self.redis.sadd(UNLOADED_KEY, model)
        self.forget()
        await self.core.announce(events.MODEL_UNLOADED, {"model": model})
        # every node and variant: a heartbeat may not list yet what a node loaded a moment ago
        calls = [(n, v) for n in self.core.nodes.nodes for v in variants]
        results = await asyncio.gather(*(self.clients.unload(n.address, v.name, v.version, v.precision,
                                                             self.node_timeout_s) for n, v in calls),
                                       return_exceptions=True)
        dropped = set()
        for (node, variant), result in zip(calls, results):
            if isinstance(result, BaseException):
                if not isinstance(result, CneiError):
                    raise result
                log.warning("model %s: %s not unloaded from %s: %s", model, variant.key, node.node_id, result.message)
            elif result:
                dropped.add(node.node_id)
        log.info("model %s unloaded (dropped from %s)", model, ",".join(sorted(dropped)) or "no node")
        return sorted(dropped)
