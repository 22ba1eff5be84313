"""Node records in Redis: each runtime keeps a TTL'd record alive by heartbeating."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from redis.asyncio import Redis

from services.common.records import known_fields

NODE_KEY = "cnei:node:{}"
NODE_INDEX = "cnei:nodes"


@dataclass
class NodeInfo:
    """What a runtime says of itself in every heartbeat."""

    node_id: str
    tier: str  # "edge" | "cloud"
    region: str
    address: str  # OIP gRPC host:port
    node_class: str = ""  # hardware class for measured latencies (defaults to the tier)
    fast_address: str = ""  # internal data plane host:port (services/common/fastlane.py)
    cpus: int = 1
    memory_bytes: int = 0
    models: list[str] = field(default_factory=list)  # loaded variant keys name:version:precision
    inflight: int = 0
    cpu_load: float = 0.0  # 0..1 share of the node's CPU in use
    mem_load: float = 0.0  # 0..1 share of the node's memory in use
    cache_bytes: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0

    @property
    def place(self) -> tuple[str, str, str]:
        """Which node this is and where it is called: a node id back at other addresses is
        another node (a pod restarted elsewhere, another process claiming the id)."""
        return self.node_id, self.address, self.fast_address

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> NodeInfo:
        return cls(**known_fields(cls, json.loads(data)))


# Drops a node's record and index entry unless the record names another address (atomic).
_REMOVE_OWN = """
local record = redis.call('GET', KEYS[1])
if record then
  local ok, node = pcall(cjson.decode, record)
  if ok and type(node) == 'table' and node['address'] ~= ARGV[1] then return 0 end
  redis.call('DEL', KEYS[1])
end
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""


class NodeDirectory:
    """Register, refresh and list live nodes."""

    def __init__(self, redis: Redis):
        self.redis = redis

    async def heartbeat(self, info: NodeInfo, ttl_seconds: float) -> None:
        info.updated_at = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(NODE_KEY.format(info.node_id), info.to_json(), px=int(ttl_seconds * 1000))
            pipe.sadd(NODE_INDEX, info.node_id)
            await pipe.execute()

    async def remove(self, node_id: str, address: str = "") -> bool:
        """Drop the node's record; with `address`, only while the record is that node's (another
        process now heartbeating under the id keeps its own): whether it was dropped."""
        if not address:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(NODE_KEY.format(node_id))
                pipe.srem(NODE_INDEX, node_id)
                await pipe.execute()
            return True
        return bool(await self.redis.eval(_REMOVE_OWN, 2, NODE_KEY.format(node_id), NODE_INDEX, address, node_id))

    async def live_nodes(self) -> list[NodeInfo]:
        """Every node whose heartbeat has not expired; expired ids are pruned from the index."""
        ids = sorted(m.decode() if isinstance(m, bytes) else m
                     for m in await self.redis.smembers(NODE_INDEX))
        if not ids:
            return []
        records = await self.redis.mget([NODE_KEY.format(i) for i in ids])
        live, dead = [], []
        for node_id, record in zip(ids, records):
            if record is None:
                dead.append(node_id)
            else:
                live.append(NodeInfo.from_json(record))
        if dead:
            await self.redis.srem(NODE_INDEX, *dead)
        return live
