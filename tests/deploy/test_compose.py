"""Container deployment: the compose file against the services' settings, the Dockerfile's
hardening rules, and the gRPC health helper the compose health checks run."""
from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from grpc_health.v1 import health_pb2
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services.cli import healthcheck, infra
from services.cli.up import RUNTIMES
from services.common import settings as cfg
from services.common.lifecycle import GrpcServer
from services.common.telemetry import TelemetrySettings
from services.coordinator import settings as coordinator_settings
from services.edge_runtime import settings as runtime_settings
from services.registry import settings as registry_settings
from services.trainer import settings as trainer_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "compose" / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
REQUIREMENTS = ROOT / "deploy" / "docker" / "requirements.txt"
DASHBOARD = ROOT / "deploy" / "helm" / "cnei" / "dashboards" / "cnei-dashboard.json"  # the chart's, mounted
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"  # the prom/prometheus image's default
IMAGE = "cnei:dev"

# The module a CNEI container runs (its command) -> that service's settings class and prefix.
SETTINGS = {
    "services.registry": (registry_settings.RegistrySettings, registry_settings.PREFIX),
    "services.coordinator": (coordinator_settings.CoordinatorSettings, coordinator_settings.PREFIX),
    "services.edge_runtime": (runtime_settings.RuntimeSettings, runtime_settings.PREFIX),
    "services.trainer": (trainer_settings.TrainerSettings, trainer_settings.PREFIX),
}
ONE_SHOTS = {"demo-model"}
# Tracing is best effort (spans are dropped while Jaeger is away), so waiting for it to start
# is enough; everything else a CNEI service dials must be healthy first.
START_ONLY = {"jaeger"}
TELEMETRY_VARS = {f.name.upper() for f in dataclasses.fields(TelemetrySettings)}
# What clients on the host use of the infrastructure (Redis: `cnei status`; Jaeger: its UI); the
# rest (NATS, Jaeger's OTLP collector) stays inside the compose network.
INFRASTRUCTURE_HOST_PORTS = {"nats": set(), "redis": {6379}, "jaeger": {16686}}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def _command(svc: dict) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _cnei(services: dict) -> dict[str, dict]:
    """Long-running CNEI services (built from our image), by compose name."""
    return {name: svc for name, svc in services.items()
            if svc.get("image") == IMAGE and name not in ONE_SHOTS}


def _settings_of(name: str, svc: dict):
    module = _command(svc)[0]
    assert module in SETTINGS, f"{name}: command {module!r} is not a CNEI service module"
    cls, prefix = SETTINGS[module]
    return cls, prefix, cfg.load(cls, prefix, env=_env(svc))


def _published(svc: dict) -> list[tuple[str, int]]:
    """(host address, container port) of each port the service publishes on the host; "" for
    every interface."""
    published = []
    for spec in svc.get("ports", []):
        if isinstance(spec, dict):
            published.append((spec.get("host_ip", ""), int(spec["target"])))
        else:
            parts = str(spec).split("/")[0].split(":")
            published.append((parts[0] if len(parts) == 3 else "", int(parts[-1])))
    return published


def _container_ports(svc: dict) -> set[int]:
    """The ports the service offers: published on the host, or exposed to the compose network."""
    return {port for _, port in _published(svc)} | {int(str(p).split("/")[0]) for p in svc.get("expose", [])}


def _depends(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    assert isinstance(deps, dict), "depends_on must be the long form, with conditions"
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _mounts(svc: dict) -> dict[str, str]:
    """container path -> source for each volume."""
    mounts = {}
    for spec in svc.get("volumes", []):
        if isinstance(spec, dict):
            mounts[spec["target"]] = spec["source"]
        else:
            source, target = str(spec).split(":")[:2]
            mounts[target] = source
    return mounts


def _health_target(svc: dict) -> str:
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD", "CNEI health checks run the helper directly (exec form)"
    assert test[1:4] == ["python", "-m", "services.cli.healthcheck"]
    return test[4]


# --- compose: every service ----------------------------------------------------------------


def test_compose_has_the_mesh(services):
    assert {"nats", "redis", "jaeger", "registry", "coordinator", "demo-model", "trainer",
            "cloud-1", "edge-a1", "edge-b1", "prometheus", "grafana"} <= set(services)


def test_every_service_has_an_image_or_build(services):
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name} has neither image nor build"


def test_third_party_images_are_pinned(services):
    for name, svc in services.items():
        if "build" in svc:
            continue
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image!r} has no tag"
        # a full version, as some projects tag it (prom/prometheus: v2.53.1)
        assert tag != "latest" and re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image!r} not pinned"


def test_cnei_services_build_the_shared_image(services):
    for name, svc in services.items():
        if svc.get("image") != IMAGE:
            continue
        build = svc["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context}"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_every_long_running_service_has_a_healthcheck(services):
    for name, svc in services.items():
        if name in ONE_SHOTS:
            assert svc.get("restart") == "no", f"one-shot {name} must not be restarted"
            continue
        check = svc.get("healthcheck") or {}
        assert not check.get("disable") and check.get("test"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL")


def test_every_long_running_service_publishes_or_exposes_ports(services):
    for name, svc in services.items():
        if name not in ONE_SHOTS:
            assert _container_ports(svc), f"{name} offers no ports"


def test_every_published_port_is_bound_to_the_loopback_interface(services):
    """Clients on the host dial 127.0.0.1; nothing is offered to the host's networks (Redis and
    NATS take no credentials)."""
    for name, svc in services.items():
        for address, port in _published(svc):
            assert address == "127.0.0.1", f"{name} publishes {port} on {address or 'every interface'}"


def test_infrastructure_publishes_only_what_clients_on_the_host_use(services):
    for name, ports in INFRASTRUCTURE_HOST_PORTS.items():
        assert {port for _, port in _published(services[name])} == ports, name


def test_infrastructure_matches_what_the_services_need(services):
    nats = _command(services["nats"])
    assert "-js" in nats and nats[nats.index("-sd") + 1] == "/data"
    assert _mounts(services["nats"])["/data"] == "nats-data"
    assert 4222 in _container_ports(services["nats"])
    assert "8222/healthz" in " ".join(services["nats"]["healthcheck"]["test"])
    assert " ".join(_command(services["redis"])).endswith("--appendonly yes")
    assert _mounts(services["redis"])["/data"] == "redis-data"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert _env(services["jaeger"])["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {4317, 16686} <= _container_ports(services["jaeger"])


def test_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for source in _mounts(svc).values():
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} not declared"


# --- compose: CNEI services against their settings -------------------------------------------


def test_cnei_env_vars_are_settings_fields(services):
    """Every variable set is a field of that service's settings (or telemetry) and parses."""
    assert set(_cnei(services)) == {"registry", "coordinator", "trainer", "cloud-1", "edge-a1", "edge-b1"}
    for name, svc in _cnei(services).items():
        cls, prefix, _ = _settings_of(name, svc)
        known = {prefix + f.name.upper() for f in dataclasses.fields(cls)} | TELEMETRY_VARS | set(healthcheck.ENV)
        env = _env(svc)
        assert env, f"{name} sets no environment"
        unknown = set(env) - known
        assert not unknown, f"{name}: {sorted(unknown)} are not fields of {cls.__name__}"
        cfg.load(TelemetrySettings, "", env=env)  # values parse as well as names match


def test_cnei_services_bind_all_interfaces_and_trace_to_jaeger(services):
    for name, svc in _cnei(services).items():
        _, _, settings = _settings_of(name, svc)
        assert settings.host == "0.0.0.0", f"{name} binds {settings.host}"
        assert _env(svc)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"


def test_cnei_ports_healthchecks_and_volumes_follow_settings(services):
    for name, svc in _cnei(services).items():
        _, _, s = _settings_of(name, svc)
        published = _container_ports(svc)
        if isinstance(s, coordinator_settings.CoordinatorSettings):
            serving, grpc_port = {s.grpc_port, s.http_port, s.metrics_port}, s.grpc_port
        else:
            serving, grpc_port = {s.port, s.metrics_port}, s.port
        if isinstance(s, runtime_settings.RuntimeSettings):
            serving.add(s.http_port)  # every runtime serves OIP REST v2 too (0 would be none)
        assert serving <= published, f"{name}: serves {serving}, publishes {published}"
        assert _health_target(svc) == f"127.0.0.1:{grpc_port}", name
        if isinstance(s, registry_settings.RegistrySettings):
            assert s.data_dir in _mounts(svc), "registry data must live on a volume"
        if isinstance(s, runtime_settings.RuntimeSettings):
            assert s.cache_dir in _mounts(svc), f"{name}: cache must live on a volume"


def test_a_service_whose_server_may_require_client_certificates_gives_its_healthcheck_one(services):
    """A healthcheck that trusts the server's CA but presents no certificate fails the handshake
    as soon as the server's client CA is set (mutual TLS): the container never becomes healthy."""
    for name, svc in _cnei(services).items():
        env = _env(svc)
        client_ca = [k for k in env if re.fullmatch(r"CNEI_[A-Z]+_TLS_CLIENT_CA_FILE", k)]
        if client_ca and "CNEI_HEALTHCHECK_TLS_CA" in env:
            assert {"CNEI_HEALTHCHECK_TLS_CERT", "CNEI_HEALTHCHECK_TLS_KEY"} <= set(env), (
                f"{name}: takes {client_ca[0]} but its healthcheck has no client certificate and key")
            assert env["CNEI_HEALTHCHECK_TLS_CERT"] and env["CNEI_HEALTHCHECK_TLS_KEY"], name


def test_runtimes_are_the_local_mesh_nodes(services):
    runtimes = {}
    for name, svc in _cnei(services).items():
        _, _, s = _settings_of(name, svc)
        if isinstance(s, runtime_settings.RuntimeSettings):
            assert s.advertise_host == name, f"{name} advertises {s.advertise_host!r}"
            assert s.address == f"{name}:{s.port}"
            runtimes[s.node_id] = (s.tier, s.region)
    assert runtimes == {node: (tier, region) for node, tier, region in RUNTIMES}
    volumes = [tuple(_mounts(services[n]).values()) for n in runtimes]
    assert len(set(volumes)) == len(volumes), "each runtime needs its own cache volume"


def test_cnei_services_wait_for_healthy_dependencies(services):
    """Everything a service dials (registry, Redis, NATS) is a healthy dependency of it."""
    by_port: dict[str, int] = {}
    for name, svc in _cnei(services).items():
        _, _, s = _settings_of(name, svc)
        if isinstance(s, registry_settings.RegistrySettings):
            by_port[name] = s.port
    for name, svc in {**_cnei(services), **{n: services[n] for n in ONE_SHOTS}}.items():
        deps = _depends(svc)
        assert deps, f"{name} has no depends_on"
        for dep, condition in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if dep in ONE_SHOTS:
                expected = {"service_completed_successfully"}
            elif dep in START_ONLY:
                expected = {"service_started", "service_healthy"}
            else:
                expected = {"service_healthy"}
            assert condition in expected, f"{name} -> {dep}: {condition}"
        if name in ONE_SHOTS:
            continue
        _, _, s = _settings_of(name, svc)
        dialled = [urlparse(s.nats_url).hostname]
        if hasattr(s, "redis_url"):
            dialled.append(urlparse(s.redis_url).hostname)
        if hasattr(s, "registry_target"):
            host, port = s.registry_target.rsplit(":", 1)
            assert by_port.get(host) == int(port), f"{name}: registry target {s.registry_target}"
            dialled.append(host)
        for host in dialled:
            assert deps.get(host) == "service_healthy", f"{name} dials {host} but does not wait for it"


def test_demo_model_one_shot_targets_the_registry(services):
    svc = services["demo-model"]
    cmd = _command(svc)
    assert cmd[0] == "services.cli.register_demo"
    target = cmd[cmd.index("--registry") + 1]
    host, port = target.rsplit(":", 1)
    _, _, registry = _settings_of(host, services[host])
    assert int(port) == registry.port
    assert _depends(svc) == {host: "service_healthy"}
    assert "healthcheck" not in svc


# --- compose: Prometheus and Grafana -----------------------------------------------------------


def _flag(svc: dict, name: str, default: str) -> str:
    """The value of `--name=value` in a service's command, else the image's default."""
    values = [arg.split("=", 1)[1] for arg in _command(svc) if arg.startswith(f"--{name}=")]
    return values[-1] if values else default


def _host_path(svc: dict, container_path: str) -> Path:
    """The file of this repository a bind mount puts at `container_path` (itself or a folder above)."""
    for target, source in _mounts(svc).items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            assert source.startswith((".", "/")), f"{target} is the volume {source}, not a repository file"
            return (COMPOSE_FILE.parent / source / os.path.relpath(container_path, target)).resolve()
    raise AssertionError(f"nothing is mounted at {container_path}")


@pytest.fixture(scope="module")
def scrape_config(services) -> dict:
    prometheus = services["prometheus"]
    path = _host_path(prometheus, _flag(prometheus, "config.file", PROMETHEUS_CONFIG))
    return yaml.safe_load(path.read_text())


def test_prometheus_scrapes_every_cnei_service_at_its_metrics_port(services, scrape_config):
    expected = []
    for name, svc in _cnei(services).items():
        _, _, s = _settings_of(name, svc)
        assert s.metrics_port, f"{name} serves no metrics"
        expected.append(f"{name}:{s.metrics_port}")
    jobs = scrape_config["scrape_configs"]
    assert len({job["job_name"] for job in jobs}) == len(jobs)
    targets = [t for job in jobs for static in job["static_configs"] for t in static["targets"]]
    assert sorted(targets) == sorted(expected)  # each once, none left from a renamed service
    for job in jobs:
        assert (job.get("metrics_path", "/metrics"), job.get("scheme", "http")) == ("/metrics", "http")


def test_prometheus_keeps_its_data_on_a_volume_and_serves_its_port(services):
    prometheus = services["prometheus"]
    data = _flag(prometheus, "storage.tsdb.path", "/prometheus")
    assert not _mounts(prometheus)[data].startswith((".", "/")), "data on a named volume"
    port = int(_flag(prometheus, "web.listen-address", ":9090").rsplit(":", 1)[1])
    assert port in _container_ports(prometheus)
    assert f"127.0.0.1:{port}/-/healthy" in " ".join(prometheus["healthcheck"]["test"])


def test_grafana_is_provisioned_with_prometheus_and_the_cnei_dashboard(services, scrape_config):
    grafana = services["grafana"]
    provisioning = _env(grafana).get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
    sources = _host_path(grafana, f"{provisioning}/datasources")
    (source,) = [d for f in sorted(sources.glob("*.yml")) for d in yaml.safe_load(f.read_text())["datasources"]]
    url = urlparse(source["url"])
    assert (source["type"], source["isDefault"], url.hostname) == ("prometheus", True, "prometheus")
    assert url.port in _container_ports(services["prometheus"])
    # Grafana's $__rate_interval is four scrape intervals once it knows the interval
    assert source["jsonData"]["timeInterval"] == scrape_config["global"]["scrape_interval"]
    assert _depends(grafana) == {"prometheus": "service_healthy"}
    providers = _host_path(grafana, f"{provisioning}/dashboards")
    (provider,) = [p for f in sorted(providers.glob("*.yml")) for p in yaml.safe_load(f.read_text())["providers"]]
    assert provider["type"] == "file"
    assert list(_host_path(grafana, provider["options"]["path"]).glob("*.json")) == [DASHBOARD]
    assert _host_path(grafana, _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]) == DASHBOARD
    assert "127.0.0.1:3000/api/health" in " ".join(grafana["healthcheck"]["test"])
    assert 3000 in _container_ports(grafana)


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this machine")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if version.returncode != 0:
        pytest.skip(f"`docker compose` does not run here: {(version.stderr or version.stdout).strip()}")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- Dockerfile --------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _stages(instructions) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def test_dockerfile_base_is_pinned_and_multi_stage(dockerfile):
    global_args = {}
    for keyword, args in dockerfile:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            global_args[key] = value
    stages = _stages(dockerfile)
    assert len(stages) >= 2, "build and runtime stages expected"
    names = set()
    for stage in stages:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m.group(1)], stage[0][1].split()[0])
        if image in names:
            continue
        repo, _, tag = image.rpartition(":")
        assert repo == "python", f"base {image}"
        assert "latest" not in tag and re.match(r"3\.11\.\d+-slim", tag), f"base {image} not pinned"
        parts = stage[0][1].split()
        if len(parts) == 3 and parts[1].upper() == "AS":
            names.add(parts[2])
    final = stages[-1]
    assert any(k == "COPY" and "--from=" in a and "/opt/venv" in a for k, a in final)


def test_dockerfile_build_stage_generates_stubs_and_installs_the_project(dockerfile):
    build = " ".join(a for k, a in _stages(dockerfile)[0] if k == "RUN")
    assert "scripts/gen-protos.sh" in build  # the same generator `make protos` runs
    assert re.search(r"/opt/venv/bin/pip install [^&]*-c deploy/docker/requirements.txt \.", build)


def test_dockerfile_final_stage_runs_as_non_root_with_exec_form(dockerfile):
    final = _stages(dockerfile)[-1]
    users = [a for k, a in final if k == "USER"]
    assert users, "final stage has no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    for keyword in ("ENTRYPOINT", "CMD"):
        args = [a for k, a in final if k == keyword]
        assert args, f"no {keyword}"
        form = json.loads(args[-1])  # exec form is a JSON array
        assert isinstance(form, list) and all(isinstance(x, str) for x in form)
    entry = json.loads([a for k, a in final if k == "ENTRYPOINT"][-1])
    cmd = json.loads([a for k, a in final if k == "CMD"][-1])
    assert entry == ["python", "-m"] and cmd[0] in SETTINGS


def _made_in_the_image(final_stage) -> dict[str, bool]:
    """Directories the final stage's RUN lines `mkdir -p`, each with whether a `chown -R` to the
    image's user covers it."""
    runs = " && ".join(a for k, a in final_stage if k == "RUN")
    made = {p for m in re.finditer(r"mkdir -p ((?:/[^\s&;]+\s*)+)", runs) for p in m.group(1).split()}
    owned = [m.group(1) for m in re.finditer(r"chown -R cnei:cnei (/[^\s&;]*)", runs)]
    return {d: any(d == o or d.startswith(o.rstrip("/") + "/") for o in owned) for d in made}


def test_every_data_dir_on_a_volume_is_made_in_the_image_and_owned_by_its_user(services, dockerfile):
    """Docker gives an empty named volume the owner of the image directory it is mounted on, and
    root when the image lacks it: a service running as the image's user could not write there."""
    made = _made_in_the_image(_stages(dockerfile)[-1])
    checked = 0
    for name, svc in _cnei(services).items():
        _, _, s = _settings_of(name, svc)
        mounts = _mounts(svc)
        for f in dataclasses.fields(s):
            path = getattr(s, f.name)
            if f.name.endswith("_dir") and path in mounts:
                assert made.get(path), f"{name}: {f.name} {path} is a volume the Dockerfile does not make for cnei"
                checked += 1
    assert checked >= 5  # registry, three runtimes, trainer


def test_requirements_pin_every_dependency_within_pyproject_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"{line} is not pinned"
            pins[canonicalize_name(req.name)] = spec[0].version
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in {REQUIREMENTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} vs {dep}"


_OPTIONAL = ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")


def _services_imports() -> dict[str, str]:
    """Third-party top-level modules `services/` imports, each with a file importing it; an
    import inside a `try` that carries on without it (an optional package: NVML) is left out."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        tree = ast.parse(path.read_text())
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                    and any(h.type is None or any(getattr(e, "id", "") in _OPTIONAL
                                                  for e in ([h.type] if not isinstance(h.type, ast.Tuple)
                                                            else h.type.elts)) for h in t.handlers)
                    for stmt in t.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"services"}:
                found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _dependency_closure() -> set[str]:
    """pyproject's [project.dependencies] and everything they need, as installed here."""
    from importlib import metadata

    todo = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    closure: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in closure or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        closure.add(name)
        todo.extend(Requirement(r) for r in metadata.requires(req.name) or [])
    return closure


def test_every_package_the_services_import_is_a_dependency_the_image_pins():
    from importlib import metadata

    closure, providers = _dependency_closure(), metadata.packages_distributions()
    pinned = {canonicalize_name(Requirement(line.split("#", 1)[0]).name)
              for line in REQUIREMENTS.read_text().splitlines() if line.split("#", 1)[0].strip()}
    imports = _services_imports()
    assert {"numpy", "grpc", "onnxruntime"} <= set(imports)  # the scan sees the imports
    for module, where in sorted(imports.items()):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists & closure, f"{where} imports {module} ({sorted(dists)}), not in pyproject's dependencies"
        assert dists & pinned, f"{where} imports {module} ({sorted(dists)}), not pinned in {REQUIREMENTS.name}"


def test_dockerignore_keeps_local_state_out_of_the_context():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".cnei", "services/pb", ".git"} <= lines
    assert any("__pycache__" in line for line in lines)


# --- the health helper ---------------------------------------------------------------------


def _python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


async def _healthcheck(*args: str) -> tuple[int, str]:
    """Run the helper as the container would; asynchronously, so the server keeps serving."""
    proc = await asyncio.create_subprocess_exec(
        _python(), "-m", "services.cli.healthcheck", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode, out.decode()


async def test_healthcheck_exits_0_when_serving_and_1_when_not():
    server = GrpcServer("127.0.0.1", 0)
    await server.start()
    try:
        code, out = await _healthcheck(server.address)
        assert code == 0, out
        assert "SERVING" in out
        code, out = await _healthcheck(server.address, "--service", "no.such.Service")
        assert code == 1, out
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        code, out = await _healthcheck(server.address)
        assert code == 1 and "NOT_SERVING" in out, out
    finally:
        await server.stop(0)


async def test_healthcheck_exits_1_on_a_closed_port():
    port = infra.free_port()
    code, out = await _healthcheck(f"127.0.0.1:{port}")
    assert code == 1, out
    assert "UNAVAILABLE" in out or "DEADLINE_EXCEEDED" in out


# --- the demo-model one-shot ---------------------------------------------------------------


def test_register_demo_pushes_the_digits_variants_once(nats_server, digits_models, tmp_path):
    port = infra.free_port()
    env = {"CNEI_REGISTRY_PORT": str(port), "CNEI_REGISTRY_METRICS_PORT": "0",
           "CNEI_REGISTRY_DATA_DIR": str(tmp_path / "registry"), "CNEI_REGISTRY_NATS_URL": nats_server}
    registry = subprocess.Popen([_python(), "-m", "services.registry"], cwd=ROOT,
                                env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
    try:
        infra.wait_for_port("127.0.0.1", port, timeout=30, proc=registry)
        cmd = [_python(), "-m", "services.cli.register_demo", "--registry", f"127.0.0.1:{port}",
               "--models-dir", str(digits_models[0].path.parent)]  # reuses the session's build
        first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert [line.split(" (")[0] for line in first.stdout.splitlines()] == [
            "registered digits v1 FP32", "registered digits v1 FP16", "registered digits v1 INT8"]
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert all(line.endswith("already registered") for line in again.stdout.splitlines())
        assert len(again.stdout.splitlines()) == 3
    finally:
        infra.stop(registry)


def test_register_demo_fails_cleanly_without_a_registry(tmp_path):
    port = infra.free_port()
    result = subprocess.run([_python(), "-m", "services.cli.register_demo", "--registry",
                             f"127.0.0.1:{port}", "--models-dir", str(tmp_path), "--wait", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "not serving (UNAVAILABLE" in result.stderr
    assert not list(tmp_path.iterdir()), "nothing is built while the registry is away"


def test_the_trainer_reaches_the_mesh_and_each_edge_holds_its_own_shard(services):
    _, _, trainer = _settings_of("trainer", services["trainer"])
    assert trainer.data_dir in _mounts(services["trainer"]), "trained variants must live on a volume"
    shards = set()
    for name in ("edge-a1", "edge-b1"):
        _, _, s = _settings_of(name, services[name])
        assert s.shard_count == 2
        shards.add(s.shard_index)
    assert shards == {0, 1}
