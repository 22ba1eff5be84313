"""The coordinator's view of live nodes over a real Redis: nodes seem gone when Redis comes back
with their records expired (a restart, an outage) and must not be dropped for it; a node that
really stops heartbeating is; a node id back at other addresses leaves and comes back; and the
unloaded-models set is served from memory while Redis is away."""
from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from services.cli import infra
from services.common import events
from services.common.nodes import NODE_KEY, NodeDirectory, NodeInfo
from services.coordinator.nodes_view import NodesView, diff_nodes
from services.coordinator.repository import UNLOADED_KEY, ModelControl


def _node(node_id: str, port: int = 7000) -> NodeInfo:
    return NodeInfo(node_id, "edge", "site-a", f"127.0.0.1:{port}", fast_address=f"127.0.0.1:{port + 1}",
                    updated_at=time.time())


def _view(redis: Redis, grace_s: float = 0.5) -> tuple[NodesView, list[tuple[str, str]]]:
    told: list[tuple[str, str]] = []
    view = NodesView(NodeDirectory(redis), 0.1, on_change=lambda kind, node, why: told.append((kind, node.node_id)),
                     grace_s=grace_s)
    return view, told


def test_a_node_id_back_at_other_addresses_left_and_came_back():
    before = [_node("a", 7000), _node("b", 7010)]
    after = [_node("a", 7000), _node("b", 7020), _node("c", 7030)]
    appeared, vanished = diff_nodes(before, after)
    assert [(n.node_id, n.address) for n in appeared] == [("b", "127.0.0.1:7020"), ("c", "127.0.0.1:7030")]
    assert [(n.node_id, n.address) for n in vanished] == [("b", "127.0.0.1:7010")]


async def _viewing(redis: Redis, *nodes: NodeInfo, grace_s: float = 0.5):
    """(directory, view, what it told) once the view has seen `nodes` heartbeat."""
    directory = NodeDirectory(redis)
    for node in nodes:
        await directory.heartbeat(node, 30)
    view, told = _view(redis, grace_s)
    await view.refresh()
    assert sorted(n.node_id for n in view.nodes) == sorted(n.node_id for n in nodes)
    told.clear()
    return directory, view, told


async def test_nodes_whose_records_all_vanish_at_once_are_kept_for_the_grace_period(own_redis):
    directory, view, told = await _viewing(own_redis, _node("a", 7000), _node("b", 7010))

    await own_redis.delete(NODE_KEY.format("a"), NODE_KEY.format("b"))  # as a Redis reloaded with them expired
    await view.refresh()
    assert sorted(n.node_id for n in view.nodes) == ["a", "b"] and told == []
    await directory.heartbeat(_node("a", 7000), 30)  # a heartbeats again; b never does
    time.sleep(0.6)
    await view.refresh()
    assert [n.node_id for n in view.nodes] == ["a"]
    assert told == [(events.NODE_DOWN, "b")]


async def test_one_node_that_stops_heartbeating_is_gone_at_once(own_redis):
    _, view, told = await _viewing(own_redis, _node("a", 7000), _node("b", 7010))
    await own_redis.delete(NODE_KEY.format("b"))
    await view.refresh()
    assert [n.node_id for n in view.nodes] == ["a"] and told == [(events.NODE_DOWN, "b")]


async def test_after_redis_is_back_from_an_outage_missing_nodes_get_the_grace_period(tmp_path):
    port = infra.free_port()
    server = infra.start_redis(port, tmp_path / "redis")
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        directory, view, told = await _viewing(redis, _node("a", 7000), _node("b", 7010))
        infra.stop(server)
        with pytest.raises(Exception):
            await view.refresh()  # Redis away: the view stays as it was
        assert sorted(n.node_id for n in view.nodes) == ["a", "b"]
        server = infra.start_redis(port, tmp_path / "redis-again")  # back empty: b's record is gone
        await directory.heartbeat(_node("a", 7000), 30)
        await view.refresh()
        assert sorted(n.node_id for n in view.nodes) == ["a", "b"] and told == []
        time.sleep(0.6)
        await view.refresh()
        assert [n.node_id for n in view.nodes] == ["a"] and told == [(events.NODE_DOWN, "b")]
    finally:
        await redis.aclose()
        infra.stop(server)


async def test_the_unloaded_models_are_served_from_memory_while_redis_is_away(tmp_path):
    port = infra.free_port()
    server = infra.start_redis(port, tmp_path / "redis")
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        await redis.sadd(UNLOADED_KEY, "old-model")
        control = ModelControl(None, redis, None, ttl_s=0.0)
        assert await control.unloaded() == frozenset({"old-model"})
        infra.stop(server)
        assert await control.unloaded() == frozenset({"old-model"})  # not an error for every request
    finally:
        await redis.aclose()
        infra.stop(server)


async def test_a_node_leaving_removes_its_own_record_never_a_successors_under_its_id(own_redis):
    directory = NodeDirectory(own_redis)
    await directory.heartbeat(_node("a", 7000), 30)
    await directory.heartbeat(_node("a", 7100), 30)  # another process now claims the id
    assert not await directory.remove("a", "127.0.0.1:7000")  # the old one stopping
    assert [(n.node_id, n.address) for n in await directory.live_nodes()] == [("a", "127.0.0.1:7100")]
    assert await directory.remove("a", "127.0.0.1:7100")
    assert await directory.live_nodes() == []


async def test_the_grace_after_a_reset_holds_while_nodes_heartbeat_again_one_by_one(own_redis):
    directory, view, told = await _viewing(own_redis, _node("a", 7000), _node("b", 7010), _node("c", 7020),
                                           grace_s=2.0)
    await own_redis.delete(NODE_KEY.format("a"), NODE_KEY.format("b"), NODE_KEY.format("c"))  # Redis reloaded
    await view.refresh()
    await directory.heartbeat(_node("a", 7000), 30)  # a's heartbeat comes first; b and c a moment later
    await view.refresh()
    assert sorted(n.node_id for n in view.nodes) == ["a", "b", "c"] and told == []


async def test_a_redis_outage_is_logged_once_and_its_end_once_not_at_every_refresh(tmp_path, caplog):
    port = infra.free_port()
    server = infra.start_redis(port, tmp_path / "redis")
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        _, view, _ = await _viewing(redis, _node("a", 7000))
        infra.stop(server)
        with caplog.at_level("INFO", logger="services.coordinator.nodes_view"):
            await view.start()  # refreshes every 0.1 s
            await asyncio.sleep(1.5)
            server = infra.start_redis(port, tmp_path / "redis-again")
            await asyncio.sleep(1.0)
            await view.close()
        lines = [r.getMessage() for r in caplog.records if "node refresh" in r.getMessage()]
        assert len(lines) == 2, lines
        assert lines[0].startswith("node refresh failed: ") and "the last view is kept" in lines[0]
        assert lines[1].startswith("node refresh works again after ") and "failures" in lines[1]
    finally:
        await redis.aclose()
        infra.stop(server)
