"""Node choice: EdgeAIScheduler score parts, weights and threshold, and the baseline policies."""
from __future__ import annotations

import pytest

from services.common.deployment import SchedulerSpec
from services.common.nodes import NodeInfo
from services.coordinator.placement import (NodeScore, RequestContext, Scheduler, failover_stages,
                                            least_loaded, locality_score, model_score, network_score, rank,
                                            resource_score, score, spread, with_door_rows)

KEY = "digits:1:FP32"
CTX = RequestContext(model="digits", variant_key=KEY)


def _node(node_id: str, tier: str = "edge", region: str = "north", models: tuple[str, ...] = (),
          **load) -> NodeInfo:
    return NodeInfo(node_id=node_id, tier=tier, region=region, address=f"{node_id}:8001",
                    models=list(models), **load)


def _only(**weights) -> SchedulerSpec:
    """A spec weighing only the named score parts (others 0) with no threshold."""
    parts = {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0, "threshold": 0.0}
    return SchedulerSpec(**{**parts, **weights})


@pytest.mark.parametrize(
    ("load", "outstanding", "expected"),
    [({}, 0, 1.0),
     ({"cpu_load": 0.5, "mem_load": 0.2}, 0, 1 - 0.35 * 0.5 - 0.15 * 0.2),
     ({"cpus": 2, "inflight": 2}, 2, 1 - 0.5 * 0.5),
     ({"cpus": 1}, 100, 0.5),
     ({"cpu_load": 1.0, "mem_load": 1.0, "inflight": 4}, 0, 0.0)],
    ids=["idle", "cpu-and-memory", "queue-counts-our-outstanding", "queue-saturates-at-half", "flat-out"],
)
def test_resource_score_falls_with_cpu_memory_and_queue_depth(load, outstanding, expected):
    assert resource_score(_node("a", **load), outstanding) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("tier", "node_region", "request_region", "expected"),
    [("edge", "north", "north", 1.0), ("cloud", "north", "north", 1.0), ("cloud", "central", "north", 0.4),
     ("edge", "south", "north", 0.1), ("edge", "north", "", 0.6), ("cloud", "central", "", 0.4)],
    ids=["same-region-edge", "same-region-cloud", "cloud-elsewhere", "edge-elsewhere",
         "no-region-edge", "no-region-cloud"],
)
def test_locality_score_prefers_the_requests_region_then_the_cloud_over_other_edges(
        tier, node_region, request_region, expected):
    assert locality_score(_node("a", tier, node_region), request_region) == expected


@pytest.mark.parametrize(
    ("models", "expected"),
    [((KEY,), 1.0), (("digits:1:INT8",), 0.5), (("digits:2:FP32", "mnist:1:FP32"), 0.5),
     (("digits2:1:FP32",), 0.0), ((), 0.0)],
    ids=["warm-variant", "other-precision", "other-version", "similar-name-is-cold", "nothing-loaded"],
)
def test_model_score_is_one_when_warm_half_for_another_variant_and_zero_when_cold(models, expected):
    assert model_score(_node("a", models=models), CTX) == expected


@pytest.mark.parametrize(
    ("rtt_ms", "expected"),
    [(0.0, 1.0), (10.0, 0.5), (30.0, 0.25), (None, 0.5), (-3.0, 1.0)],
    ids=["zero", "reference", "three-references", "unknown", "negative-clamped"],
)
def test_network_score_halves_at_the_reference_rtt(rtt_ms, expected):
    assert network_score(rtt_ms) == pytest.approx(expected)


def test_the_total_is_the_weighted_mean_of_the_parts():
    node = _node("a", region="south", models=("digits:1:INT8",), cpu_load=0.4)
    got = score(node, RequestContext("digits", KEY, region="north"),
                SchedulerSpec(alpha=2, beta=1, gamma=1, delta=0), outstanding=0, rtt_ms=10.0)
    assert (got.resource, got.locality, got.model, got.network) == pytest.approx((0.86, 0.1, 0.5, 0.5))
    assert got.total == pytest.approx((2 * 0.86 + 0.1 + 0.5) / 4)
    assert got.node is node


def test_all_zero_weights_give_a_total_of_zero_rather_than_failing():
    assert score(_node("a"), CTX, _only(), 0, None).total == 0.0


@pytest.mark.parametrize(
    ("weights", "winner"),
    [({"alpha": 1}, "idle-far"), ({"beta": 1}, "busy-near")],
    ids=["resource-only", "locality-only"],
)
def test_the_weights_decide_between_a_busy_near_node_and_an_idle_far_one(weights, winner):
    nodes = [_node("busy-near", region="north", cpu_load=1.0), _node("idle-far", region="south")]
    ranked = rank(nodes, RequestContext("digits", KEY, region="north"), _only(**weights), {}, {})
    assert ranked[0].node.node_id == winner


def test_rank_orders_every_node_best_first_and_breaks_ties_by_node_id():
    nodes = [_node("c"), _node("b"), _node("a", cpu_load=1.0)]
    ranked = rank(nodes, CTX, SchedulerSpec(), {}, {})
    assert [s.node.node_id for s in ranked] == ["b", "c", "a"]
    assert ranked[0].total == ranked[1].total > ranked[2].total


def test_a_node_below_the_threshold_is_ranked_after_the_others_but_kept():
    nodes = [_node("weak", cpu_load=1.0, mem_load=1.0, inflight=4), _node("ok")]
    spec = _only(alpha=1, threshold=0.5)
    ranked = rank(nodes, CTX, spec, {}, {})
    assert [(s.node.node_id, s.total >= spec.threshold) for s in ranked] == [("ok", True), ("weak", False)]
    assert Scheduler().choose(nodes[:1], CTX, spec, {}, {}).node_id == "weak"


def test_our_own_outstanding_requests_count_against_a_node():
    nodes = [_node("a", cpus=1), _node("b", cpus=1)]
    assert rank(nodes, CTX, _only(alpha=1), {"a": 3}, {})[0].node.node_id == "b"


@pytest.mark.parametrize(
    ("nodes", "ctx", "rtt_ms", "winner"),
    [([_node("a", region="south"), _node("b", region="north")], RequestContext("digits", KEY, "north"), {}, "b"),
     ([_node("a"), _node("b", models=(KEY,))], CTX, {}, "b"),
     ([_node("a", models=("digits:1:INT8",)), _node("b", models=(KEY,))], CTX, {}, "b"),
     ([_node("a"), _node("b")], CTX, {"a": 40.0, "b": 2.0}, "b"),
     ([_node("a", "cloud", "central"), _node("b", "edge", "north")], CTX, {}, "b")],
    ids=["same-region", "warm-model", "warm-precision", "lower-rtt", "edge-when-no-region"],
)
def test_edgeai_prefers_locality_warm_models_and_low_rtt(nodes, ctx, rtt_ms, winner):
    assert Scheduler().choose(nodes, ctx, SchedulerSpec(), {}, rtt_ms).node_id == winner


def test_round_robin_cycles_through_the_nodes_in_node_id_order():
    scheduler, spec = Scheduler(), SchedulerSpec(policy="round_robin")
    nodes = [_node("c"), _node("a"), _node("b")]
    picks = [scheduler.choose(nodes, CTX, spec, {}, {}).node_id for _ in range(6)]
    assert sorted(picks[:3]) == ["a", "b", "c"]
    assert picks[3:] == picks[:3]


def test_random_is_deterministic_for_a_seed_and_reaches_every_node():
    spec, nodes = SchedulerSpec(policy="random"), [_node("a"), _node("b"), _node("c")]

    def picks(seed: int) -> list[str]:
        scheduler = Scheduler(seed=seed)
        return [scheduler.choose(nodes, CTX, spec, {}, {}).node_id for _ in range(60)]

    assert picks(7) == picks(7)
    assert set(picks(7)) == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("nodes", "outstanding", "winner"),
    [([_node("a", inflight=3), _node("b", inflight=1), _node("c", inflight=2)], {}, "b"),
     ([_node("a"), _node("b")], {"a": 2, "b": 1}, "b"),
     ([_node("a", cpus=4, inflight=4), _node("b", cpus=1, inflight=2)], {}, "a"),
     ([_node("a", cpu_load=0.9), _node("b", cpu_load=0.1)], {}, "b"),
     ([_node("b"), _node("a")], {}, "a")],
    ids=["fewest-in-flight", "our-outstanding-counts", "per-cpu", "cpu-load-breaks-ties", "node-id-breaks-ties"],
)
def test_least_loaded_picks_the_node_with_the_fewest_requests_per_cpu(nodes, outstanding, winner):
    assert least_loaded(nodes, outstanding).node_id == winner
    assert Scheduler().choose(nodes, CTX, SchedulerSpec(policy="least_loaded"), outstanding, {}).node_id == winner


@pytest.mark.parametrize("policy", ["edgeai", "round_robin", "random", "least_loaded"])
def test_excluded_nodes_are_never_chosen(policy):
    scheduler, spec = Scheduler(seed=1), SchedulerSpec(policy=policy)
    nodes = [_node("a", models=(KEY,)), _node("b"), _node("c")]
    picks = {scheduler.choose(nodes, CTX, spec, {}, {}, exclude=("a", "c")).node_id for _ in range(10)}
    assert picks == {"b"}


@pytest.mark.parametrize("policy", ["edgeai", "round_robin", "random", "least_loaded"])
@pytest.mark.parametrize(("nodes", "exclude"), [([], ()), ([_node("a"), _node("b")], ("a", "b"))],
                         ids=["no-nodes", "all-excluded"])
def test_no_node_is_chosen_when_none_is_left(policy, nodes, exclude):
    assert Scheduler().choose(nodes, CTX, SchedulerSpec(policy=policy), {}, {}, exclude=exclude) is None


def test_failover_goes_to_same_region_edges_then_the_cloud_then_other_regions():
    failed = _node("n1", region="north")
    nodes = [failed, _node("s1", region="south"), _node("c1", "cloud", "central"), _node("n2", region="north")]
    stages = failover_stages(nodes, failed, cloud_fallback=True)
    assert [[n.node_id for n in stage] for stage in stages] == [["n2"], ["c1"], ["s1"]]
    no_cloud = failover_stages(nodes, failed, cloud_fallback=False)
    assert [[n.node_id for n in stage] for stage in no_cloud] == [["n2"], ["s1"]]


def test_when_no_node_reaches_the_threshold_the_cloud_tier_is_preferred():
    from services.common.deployment import SchedulerSpec
    from services.common.nodes import NodeInfo
    from services.coordinator.placement import RequestContext, rank

    edge = NodeInfo("edge-1", "edge", "site-a", "e:1", cpus=1, inflight=8, cpu_load=1.0)
    cloud = NodeInfo("cloud-1", "cloud", "cloud", "c:1", cpus=1, inflight=8, cpu_load=1.0)
    ctx = RequestContext(model="m", variant_key="m:1:FP32", region="site-a")
    spec = SchedulerSpec(threshold=0.99)
    ranked = rank([edge, cloud], ctx, spec, {}, {"edge-1": 1.0, "cloud-1": 50.0})
    assert ranked[0].total < spec.threshold and ranked[1].total < spec.threshold
    assert ranked[0].node.node_id == "cloud-1"
    assert rank([edge, cloud], ctx, SchedulerSpec(threshold=0.0), {}, {"edge-1": 1.0, "cloud-1": 50.0})[0].node.node_id == "edge-1"


def _scored(*totals: float) -> list[NodeScore]:
    return [NodeScore(_node(f"n{i}"), t, 0.0, 0.0, 0.0, 0.0) for i, t in enumerate(totals)]


@pytest.mark.parametrize(
    ("totals", "threshold", "margin", "limit", "expected"),
    [((0.9, 0.85, 0.82, 0.5), 0.3, 0.1, 4, ["n0", "n1", "n2"]),   # within the margin of the best
     ((0.9, 0.85, 0.82), 0.3, 0.1, 2, ["n0", "n1"]),              # no more than the limit
     ((0.9, 0.75), 0.3, 0.1, 4, ["n0"]),                          # too far behind
     ((0.5, 0.45), 0.48, 0.1, 4, ["n0"]),                         # below the threshold
     ((0.2, 0.2), 0.3, 0.1, 4, ["n0"]),                           # nothing qualifies: the best alone
     ((), 0.3, 0.1, 4, [])],
    ids=["close-scores", "limit", "far-behind", "below-threshold", "none-qualifies", "no-nodes"])
def test_a_route_spreads_over_the_nodes_scoring_close_to_the_best(totals, threshold, margin, limit, expected):
    assert [n.node_id for n in spread(_scored(*totals), threshold, margin, limit)] == expected


def test_a_route_spreads_only_over_peers_of_the_best_node_never_to_the_cloud_or_another_site():
    ranked = [NodeScore(node, total, 0.0, 0.0, 0.0, 0.0) for node, total in [
        (_node("a1", region="north"), 0.9), (_node("cloud", tier="cloud", region="dc"), 0.89),
        (_node("b1", region="south"), 0.88), (_node("a2", region="north"), 0.87)]]
    assert [n.node_id for n in spread(ranked, 0.3, 0.1, 4)] == ["a1", "a2"]


def test_each_node_is_judged_warm_on_the_variant_it_would_serve():
    """A policy choosing INT8: a node with only FP32 loaded is not warm for it, one with INT8 is."""
    int8 = "digits:1:INT8"
    ctx = RequestContext("digits", KEY, variant_keys={"has-fp32": int8, "has-int8": int8})
    nodes = [_node("has-fp32", models=(KEY,)), _node("has-int8", models=(int8,))]
    assert [model_score(n, ctx) for n in nodes] == [0.5, 1.0]
    assert Scheduler().choose(nodes, ctx, SchedulerSpec(), {}, {}).node_id == "has-int8"
    assert model_score(_node("other", models=(KEY,)), ctx) == 1.0  # a node not named: `variant_key`


def test_round_robin_keeps_a_turn_per_model_so_interleaved_models_each_cycle_every_node():
    scheduler, spec = Scheduler(), SchedulerSpec(policy="round_robin")
    nodes = [_node("a"), _node("b")]
    picks: dict[str, list[str]] = {"m1": [], "m2": []}
    for _ in range(4):
        for model in picks:
            picks[model].append(scheduler.choose(nodes, RequestContext(model, f"{model}:1:FP32"), spec, {}, {}).node_id)
    assert picks["m1"] == picks["m2"] and sorted(picks["m1"]) == ["a", "a", "b", "b"]
    assert picks["m1"][0] != picks["m1"][1]


@pytest.mark.parametrize(
    ("door_rows", "age_s", "expected"),
    [({"a": 12, "c": 3}, 0.2, {"a": 13, "b": 2, "c": 3}),
     ({"a": 12, "c": 3}, 1.0, {"a": 13, "b": 2, "c": 3}),
     ({"a": 12, "c": 3}, 1.01, {"a": 1, "b": 2}),
     ({"a": 12}, None, {"a": 1, "b": 2}),
     ({"a": 0, "b": -1}, 0.2, {"a": 1, "b": 2}),
     ({}, 0.2, {"a": 1, "b": 2})],
    ids=["fresh-adds", "at-the-age-limit-adds", "stale-dropped", "no-report-yet", "none-held", "no-nodes"],
)
def test_the_doors_rows_add_to_our_own_while_its_last_report_is_fresh(door_rows, age_s, expected):
    own = {"a": 1, "b": 2}
    assert with_door_rows(own, door_rows, age_s, max_age_s=1.0) == expected
    assert own == {"a": 1, "b": 2}


def test_least_loaded_passes_over_a_node_the_door_keeps_busy_until_its_report_is_stale():
    nodes = [_node("a"), _node("b")]
    fresh, stale = (with_door_rows({"b": 2}, {"a": 12}, age, max_age_s=1.0) for age in (0.5, 5.0))
    assert least_loaded(nodes, fresh).node_id == "b"
    assert least_loaded(nodes, stale).node_id == "a"
