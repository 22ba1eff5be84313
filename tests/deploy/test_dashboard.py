"""The Grafana dashboard deploy/helm/cnei/dashboards/cnei-dashboard.json against the metrics the services
register: every series a panel queries, and every label it selects, groups or names a legend by,
is one some service exports, so renaming a metric or a label fails here."""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.common.triton_metrics import TritonMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "helm" / "cnei" / "dashboards" / "cnei-dashboard.json"
# Grafana 10.0 wrote schemaVersion 38, 11.x writes 39 to 41.
SCHEMA_VERSIONS = range(38, 42)
SCRAPE_LABELS = frozenset({"job", "instance"})  # Prometheus adds them to every series it scrapes
# The series a family of each type is exposed as (prometheus_client names a counter "x" x_total).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"), "gauge": ("",), "unknown": ("",), "info": ("_info",)}
PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                          "bool", "and", "or", "unless", "inf", "nan"})
METRIC_DEFINITION = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(")


@dataclass(frozen=True)
class Query:
    """What one PromQL expression reads: series names and the labels it uses."""
    series: frozenset[str]
    selected: tuple[tuple[str, str], ...]  # (series, label) of each label matcher
    grouped: frozenset[str]  # labels of by (...) / without (...) / on (...) clauses


def _metric_modules() -> list[str]:
    """Every service module that defines a prometheus_client metric."""
    modules = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[1] == "pb" or path.name == "__main__.py":
            continue
        text = path.read_text()
        if "prometheus_client" in text and METRIC_DEFINITION.search(text):
            modules.append(".".join(rel.with_suffix("").parts))
    return modules


def _families(collector) -> list[tuple[str, str, frozenset[str]]]:
    """(name, type, label names) of each family a collector describes."""
    described = collector.describe() if hasattr(collector, "describe") else collector.collect()
    out = []
    for family in described:
        # a prometheus_client metric's labels, else those a custom collector's family declares
        # (Triton's) or its samples carry (the process and platform collectors)
        labels = set(getattr(collector, "_labelnames", getattr(family, "_labelnames", ())))
        labels |= {k for sample in family.samples for k in sample.labels}
        out.append((family.name, family.type, frozenset(labels)))
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    """Every series name the services export -> its label names."""
    for module in _metric_modules():
        importlib.import_module(module)
    collectors = list(REGISTRY._collector_to_names)  # the collectors the default registry holds
    series = {}
    for collector in [*collectors, TritonMetrics(lambda: [])]:
        for name, kind, labels in _families(collector):
            for suffix in SUFFIXES[kind]:
                series[name + suffix] = labels | {"le"} if suffix == "_bucket" else labels
    return series


def parse(expr: str) -> Query:
    """The series and labels a PromQL expression uses (enough PromQL for dashboards)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    selected = []
    for m in re.finditer(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}", text):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2)):
            selected.append((m.group(1) or "", label))
    text = re.sub(r"\{[^}]*\}", " ", text)
    grouped = set()
    clause = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
    for m in clause.finditer(text):
        grouped.update(x.strip() for x in m.group(1).split(",") if x.strip())
    text = clause.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # dashboard variables
    text = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ", text)
    names = {m.group(1) for m in re.finditer(r"([A-Za-z_:][\w:]*)(\s*\()?", text)
             if not m.group(2) and m.group(1) not in PROMQL_WORDS}
    return Query(frozenset(names), tuple(selected), frozenset(grouped))


def _load() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _targets() -> list[tuple[str, dict]]:
    return [(f"{p['title']} [{t['refId']}]", t) for p in _panels(_load()) for t in p.get("targets", [])]


TARGETS = _targets()


def _variable(dashboard: dict, name: str) -> dict:
    (found,) = [v for v in dashboard["templating"]["list"] if v["name"] == name]
    return found


# --- the file as Grafana reads it ------------------------------------------------------------

def test_the_dashboard_is_grafana_10_or_11_json_with_a_prometheus_datasource_variable():
    dashboard = _load()
    assert dashboard["schemaVersion"] in SCHEMA_VERSIONS
    assert dashboard["uid"] and dashboard["title"]
    datasource = _variable(dashboard, "datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")


def test_the_model_variable_lists_the_values_of_a_label_a_service_exports(exported):
    model = _variable(_load(), "model")
    assert model["type"] == "query" and model["datasource"]["uid"] == "${datasource}"
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    series, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
    assert label in exported[series]
    assert model["includeAll"] and model["allValue"] == ".*"  # `All` must match as a regex


def test_panel_ids_are_unique_and_every_query_panel_reads_the_datasource_variable():
    panels = _panels(_load())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]


# --- every query against what the services register ----------------------------------------

def test_the_query_reader_finds_series_and_labels_through_functions_and_variables():
    query = parse('histogram_quantile(0.99, sum by (le, model) (rate(cnei_x_bucket{model=~"$model",'
                  ' outcome="ok"}[$__rate_interval]))) / on (model) sum(nv_y) without (version)')
    assert query.series == {"cnei_x_bucket", "nv_y"}
    assert set(query.selected) == {("cnei_x_bucket", "model"), ("cnei_x_bucket", "outcome")}
    assert query.grouped == {"le", "model", "version"}


def test_the_services_export_counters_with_their_total_suffix(exported):
    assert "cnei_inference_requests_total" in exported and "cnei_inference_requests" not in exported
    assert exported["cnei_inference_request_duration_seconds_bucket"] == {"model", "outcome", "le"}
    assert exported["nv_inference_queue_duration_us"] == {"model", "version"}


@pytest.mark.parametrize("target", [t for _, t in TARGETS], ids=[name for name, _ in TARGETS])
def test_every_series_a_panel_queries_is_one_the_services_export(target, exported):
    query = parse(target["expr"])
    assert query.series, "no series found in the expression"
    unknown = sorted(query.series - set(exported))
    assert not unknown, f"{unknown} not exported by any service"


@pytest.mark.parametrize("target", [t for _, t in TARGETS], ids=[name for name, _ in TARGETS])
def test_every_label_a_panel_selects_groups_or_names_is_one_its_series_have(target, exported):
    query = parse(target["expr"])
    for series, label in query.selected:
        assert label in exported.get(series, set()) | SCRAPE_LABELS, f"{series} has no label {label!r}"
    legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
    for series in query.series & set(exported):
        missing = (query.grouped | legend) - exported[series] - SCRAPE_LABELS
        assert not missing, f"{series} has no label {sorted(missing)}"
