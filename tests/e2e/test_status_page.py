"""The coordinator's status page against the running mesh: its JSON, `cnei status`, and the page
rendered by headless Chromium (DOM checked, screenshot kept in test-artifacts/)."""
from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from services.cli import main as cli
from services.cli.up import RUNTIMES
from services.models.digits import load_all

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--virtual-time-budget=5000"]
PRECISIONS = {"FP32", "FP16", "INT8"}


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.headers.get_content_type(), reply.read()


def _infer(mesh, params: dict) -> None:
    x = load_all()[0][:4]
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}], "parameters": params}
    request = urllib.request.Request(mesh.rest + "/v2/models/digits/infer", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200


@pytest.fixture(scope="module")
def traffic(mesh):
    """Requests on every precision and tier, so the page has live latencies to show."""
    for precision in sorted(PRECISIONS):
        for params in ({"tier": "cloud"}, {"tier": "edge", "region": "site-a"},
                       {"tier": "edge", "region": "site-b"}):
            for _ in range(3):
                _infer(mesh, {**params, "precision": precision})
    return mesh


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make test` installs it with apt-get where it can)")
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90, check=True)


def test_the_status_json_shows_live_nodes_models_and_latencies(traffic):
    status, kind, body = _get(traffic.rest + "/api/status")
    assert (status, kind) == (200, "application/json")
    snapshot = json.loads(body)
    nodes = {n["id"]: n for n in snapshot["nodes"]}
    for node_id, tier, region in RUNTIMES:
        assert (nodes[node_id]["tier"], nodes[node_id]["region"], nodes[node_id]["health"]) == (tier, region, "live")
        assert nodes[node_id]["heartbeat_age_s"] < 5 and nodes[node_id]["rtt_ms"] is not None
    assert snapshot["models_error"] is None
    digits = next(m for m in snapshot["models"] if m["name"] == "digits")
    assert {v["precision"] for v in digits["variants"]} >= PRECISIONS
    assert all(v["accuracy"] > 0.8 for v in digits["variants"])
    assert digits["deployment"]["scheduler"] and digits["deployment"]["joint"] in ("off", "sync", "async")
    measured = {r["node"] for r in snapshot["latency"] if r["model"] == "digits"}
    assert "cloud-1" in measured and measured & {"edge-a1", "edge-b1"}  # region is a preference
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in snapshot["latency"])
    assert all({"kind", "time", "age_s"} <= set(e) for e in snapshot["events"])
    # Jobs of tests/e2e/test_federated.py, when it ran first: summaries with the page's columns.
    for job in snapshot["federated"]["jobs"]:
        assert {"id", "model", "state", "round", "rounds", "participants", "accuracy", "new_version"} <= set(job)


def test_cnei_status_prints_the_same_snapshot_as_tables(traffic, capsys):
    assert cli.main(["status", "--url", traffic.rest]) == 0
    out = capsys.readouterr().out
    for heading in ("NODES", "MODELS", "DEPLOYMENTS", "LATENCY", "RECENT FAILOVERS, ESCALATIONS AND NODE UP/DOWN", "FEDERATED JOBS"):
        assert heading in out
    assert all(node_id in out for node_id, _, _ in RUNTIMES)
    assert "digits" in out and "INT8" in out
    jobs = json.loads(_get(traffic.rest + "/api/status")[2])["federated"]["jobs"]
    assert all(j["id"] in out for j in jobs) if jobs else "none running" in out


def test_the_page_is_served_at_the_root_without_external_resources(mesh):
    status, kind, body = _get(mesh.rest + "/")
    html = body.decode()
    assert (status, kind) == (200, "text/html")
    assert "http://" not in html and "https://" not in html


def test_headless_chromium_renders_nodes_models_latency_and_the_federated_section(traffic, tmp_path):
    jobs = json.loads(_get(traffic.rest + "/api/status")[2])["federated"]["jobs"]
    dom = _chromium(tmp_path, "--dump-dom", traffic.rest + "/").stdout
    assert "coordinator reachable" in dom
    for node_id, tier, region in RUNTIMES:
        assert f'data-node="{node_id}"' in dom
    assert 'data-model="digits"' in dom
    for precision in PRECISIONS:
        assert f'data-variant="digits:1:{precision}"' in dom
    assert 'data-latency="digits@cloud-1"' in dom
    if jobs:
        assert all(f'data-job="{j["id"]}"' in dom for j in jobs)
    else:
        assert "No federated jobs are running" in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1300", traffic.rest + "/")
    assert shot.stat().st_size > 10_000
