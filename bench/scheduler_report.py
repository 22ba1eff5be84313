"""Scheduler comparison report: the verdict (edgeai p99 against every baseline) and Markdown."""
from __future__ import annotations

BASELINES = ("round_robin", "random", "least_loaded")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def round_wins(row: dict, baselines: list[dict]) -> int:
    """Rounds in which `row` had a lower p99 than every baseline in that same round (every
    policy of a round gets the same arrival times, minutes apart at most)."""
    return sum(mine < min(b["rounds_p99_ms"][i] for b in baselines)
               for i, mine in enumerate(row["rounds_p99_ms"]))


def verdict(rows: list[dict]) -> dict:
    """Each edgeai row against the baselines: pooled p99, median of per-round p99, paired rounds."""
    edgeai = [r for r in rows if r["scheduler"]["policy"] == "edgeai"]
    baselines = [r for r in rows if r["label"] in BASELINES]
    if not edgeai or not baselines:
        return {}
    best_pooled = min(b["p99_ms"] for b in baselines)
    best_median = min(b["median_round_p99_ms"] for b in baselines)
    return {r["label"]: {
        "p99_ms": r["p99_ms"], "best_baseline_p99_ms": best_pooled,
        "beats_every_baseline_p99": r["p99_ms"] < best_pooled,
        "median_round_p99_ms": r["median_round_p99_ms"], "best_baseline_median_round_p99_ms": best_median,
        "beats_every_baseline_median_round_p99": r["median_round_p99_ms"] < best_median,
        "rounds_won": round_wins(r, baselines), "rounds": len(r["rounds_p99_ms"]),
    } for r in edgeai}


def delay_not_applied(rows: list[dict], layout: list[dict]) -> list[str]:
    """Nodes that answered a request faster than their emulated one-way delay: the delay was not
    on the data path (the results would not describe the emulated cluster)."""
    delays = {n["node_id"]: n["delay_ms"] for n in layout}
    return sorted({n for r in rows for n, low in r["node_min_ms"].items()
                   if low is not None and low < delays.get(n, 0.0)})


def policy_table(rows: list[dict]) -> list[str]:
    lines = ["| policy | p50 ms | p90 ms | p99 ms | p99 per round ms (median) | success | goodput req/s | "
             "busy: sum / busiest node |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rounds = " / ".join(_fmt(v, 0) for v in r["rounds_p99_ms"])
        lines.append(f"| {r['label']} | {_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | {_fmt(r['p99_ms'])} | "
                     f"{rounds} ({_fmt(r['median_round_p99_ms'])}) | {r['success_rate']:.2%} | "
                     f"{r['goodput_rps']:.1f} | {sum(r['busy'].values()):.2f} / {max(r['busy'].values()):.2f} |")
    return lines


def node_table(rows: list[dict], layout: list[dict]) -> list[str]:
    """Per node: share of the answered requests / busy fraction / p99 of its requests."""
    nodes = [n["node_id"] for n in layout]
    head = " | ".join(f"{n['node_id']} (x{n['slowdown']:g}, {n['delay_ms']:g} ms)" for n in layout)
    lines = [f"| policy | {head} |", "|---|" + "---|" * len(nodes)]
    for r in rows:
        cells = [f"{r['node_share'].get(n, 0.0):.0%} / {r['busy'].get(n, 0.0):.0%} / "
                 f"{_fmt(r['node_p99_ms'].get(n))}" for n in nodes]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines


def rtt_line(rows: list[dict]) -> str:
    last = rows[-1]["rtt_ms"]
    return "Coordinator RTT estimates after the last run (EWMA, ms): " + ", ".join(
        f"{n} {_fmt(v)}" for n, v in sorted(last.items()))


def markdown(result: dict) -> str:
    m, v, rows = result["meta"], result["verdict"], result["rows"]
    out = ["# Scheduler comparison", "",
           f"{m['date']}, git {m['git']}, {m['mode']} run, {m['duration_s']} s; {m['machine']}.",
           f"Model: {m['model']}. Load: {m['load']}.", "",
           "Latency is measured from each request's scheduled arrival; a failed request counts at the "
           "full timeout. Busy = ONNX Runtime time (emulated slowdown included) per second of window, "
           "summed over nodes.", ""]
    out += policy_table(rows)
    loads = [x for r in rows for x in r["rounds_load_average"]]
    out += ["", f"1-minute load average at the end of each window: {min(loads):.2f} to {max(loads):.2f} "
            "(other work on the machine shows up here)."]
    out += ["", "Per node: share of answered requests / busy fraction / p99 ms of its requests.", ""]
    out += node_table(rows, m["layout"])
    out += ["", rtt_line(rows), ""]
    if result["delay_not_applied"]:
        out += [f"WARNING: {', '.join(result['delay_not_applied'])} answered faster than their emulated "
                "delay: the delay was not on the data path, so these numbers do not describe the "
                "emulated cluster.", ""]
    for label, x in v.items():
        out.append(f"- `{label}`: p99 {_fmt(x['p99_ms'])} ms vs best baseline {_fmt(x['best_baseline_p99_ms'])} ms "
                   f"({'lower' if x['beats_every_baseline_p99'] else 'NOT lower'}); median per-round p99 "
                   f"{_fmt(x['median_round_p99_ms'])} vs {_fmt(x['best_baseline_median_round_p99_ms'])} ms "
                   f"({'lower' if x['beats_every_baseline_median_round_p99'] else 'NOT lower'}); lower than every "
                   f"baseline in {x['rounds_won']} of {x['rounds']} rounds")
    return "\n".join(out) + "\n"
