"""Triton's response cache at the coordinator: a deployment with `response_cache: true` answers a
request whose inputs it has answered before from memory, without a node. Edge workloads repeat
inputs (a camera watching a still scene, a sensor at rest), and a hit saves the hop to the node
as well as its compute.

The key is the model variant that serves the request (name, version, precision: a new version
or another precision never meets old answers) and the request's input tensors (names, datatypes,
shapes, bytes) and requested outputs. Entries are evicted least recently used first to keep the
cache within its byte budget; an answer larger than the budget is not kept."""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter

from services.common import oip
from services.common.stats import ModelStats

CACHE_EVENTS = Counter("cnei_response_cache_events_total", "Response cache lookups by model and result",
                       ["model", "event"])
CACHED = "cnei_response_cache"  # response parameter: answered from the response cache


def request_key(variant_key: str, inputs: Mapping[str, np.ndarray], outputs: Iterable[str]) -> bytes:
    digest = hashlib.blake2b(variant_key.encode(), digest_size=32)
    for name in sorted(inputs):
        array = inputs[name]
        digest.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        if array.dtype == object:  # BYTES tensors: each element with its length
            for item in array.ravel():
                value = item if isinstance(item, bytes) else str(item).encode()
                digest.update(len(value).to_bytes(8, "little") + value)
        else:
            digest.update(np.ascontiguousarray(array).data)
    digest.update(b"\0outputs\0" + "\0".join(sorted(outputs)).encode())
    return digest.digest()


def from_cache(response: oip.InferResponse) -> bool:
    """Whether `response` is a kept answer (`ResponseCache.answer`): no model ran for it."""
    return response.parameters.get(CACHED) is True


@dataclass(frozen=True)
class CachedAnswer:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    parameters: dict[str, object]  # who computed it (node, tier, precision, version)
    nbytes: int


def _size(outputs: Mapping[str, np.ndarray]) -> int:
    return sum(a.nbytes if a.dtype != object else sum(len(x) for x in a.ravel()) for a in outputs.values())


class ResponseCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, max_bytes)
        self.bytes = 0
        self._entries: OrderedDict[bytes, CachedAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedAnswer | None:
        answer = self._entries.get(key)
        if answer is not None:
            self._entries.move_to_end(key)
        return answer

    def put(self, key: bytes, response: oip.InferResponse) -> bool:
        """Keep an answer (copied: the outputs may be views of a whole batch's arrays); False when
        it does not fit the budget at all."""
        outputs = response.outputs
        size = _size(outputs)
        if size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        while self._entries and self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
        self._entries[key] = CachedAnswer(response.model_name, response.model_version,
                                          {k: np.array(v, copy=True) for k, v in outputs.items()},
                                          dict(response.parameters), size)
        self.bytes += size
        return True

    async def answer(self, scope: str, request: oip.InferRequest, model: str, stats: ModelStats,
                     serve: Callable[[], Awaitable[oip.InferResponse]]) -> oip.InferResponse:
        """The answer kept for `request`'s inputs in `scope` (what else decides the answer: the
        variant, the precision policy, an ensemble's steps), else `serve()`'s, then kept."""
        start = time.perf_counter_ns()
        key = request_key(scope, request.inputs, request.outputs)
        hit = self.get(key)
        if hit is not None:
            stats.cache_hit.add(time.perf_counter_ns() - start)
            CACHE_EVENTS.labels(model, "hit").inc()
            return oip.InferResponse(model_name=hit.model_name, model_version=hit.model_version, id=request.id,
                                     outputs={name: array.copy() for name, array in hit.outputs.items()},
                                     parameters={**hit.parameters, CACHED: True})
        looked_up = time.perf_counter_ns()
        response = await serve()
        stored = time.perf_counter_ns()
        self.put(key, response)
        stats.cache_miss.add(looked_up - start + time.perf_counter_ns() - stored)
        CACHE_EVENTS.labels(model, "miss").inc()
        return response
