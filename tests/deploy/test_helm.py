"""The Helm chart deploy/helm/cnei: rendered offline by Helm's own engine (helm-python-sdk),
every object checked against the Kubernetes OpenAPI schemas (kubernetes-validate, strict),
then the properties a real cluster relies on, for several sets of values."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import helm_python as helm
import kubernetes_validate
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2

from services.cli import infra
from services.common import settings as cfg
from services.common import tls as cnei_tls
from services.common.lifecycle import GrpcServer
from services.common.telemetry import TelemetrySettings
from services.coordinator import settings as coordinator_settings
from services.edge_runtime import settings as runtime_settings
from services.edge_runtime.heartbeat import check_settings as check_heartbeat
from services.registry import settings as registry_settings
from services.trainer import settings as trainer_settings
from tests.pki import make_pki

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "cnei"
CHART_DASHBOARD = CHART / "dashboards" / "cnei-dashboard.json"  # Helm reads files inside the chart only
RELEASE, NAMESPACE = "cnei", "inference"
EDGE_LABEL = "node-role.kubernetes.io/edge"
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet"}
# Custom resources have no schema in kubernetes-validate; their shape is checked below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# The module a CNEI container runs (its args) -> that service's settings class and prefix.
SETTINGS = {
    "services.registry": (registry_settings.RegistrySettings, registry_settings.PREFIX),
    "services.coordinator": (coordinator_settings.CoordinatorSettings, coordinator_settings.PREFIX),
    "services.edge_runtime": (runtime_settings.RuntimeSettings, runtime_settings.PREFIX),
    "services.trainer": (trainer_settings.TrainerSettings, trainer_settings.PREFIX),
}
TELEMETRY_VARS = {f.name.upper() for f in dataclasses.fields(TelemetrySettings)}
# Settings port fields -> the container port name that must carry them.
PORT_FIELDS = {"port": "grpc", "grpc_port": "grpc", "http_port": "http", "metrics_port": "metrics"}
# The image's gRPC health check (services/cli/healthcheck.py), as a probe's exec command starts it.
HEALTHCHECK = ["python", "-m", "services.cli.healthcheck"]
# A CNEI server on TLS has its certificate in one of these (clients' certificates are in others).
SERVER_TLS_VARS = {"CNEI_COORDINATOR_TLS_CERT_FILE", "CNEI_REGISTRY_TLS_CERT_FILE", "CNEI_TRAINER_TLS_CERT_FILE",
                   "CNEI_RUNTIME_TLS_CERT_FILE"}
# What checking a pushed ONNX artifact adds to the registry's peak memory, over the artifact's size
# (tests/registry/test_onnx_inspect.py, PEAK_OVER_ARTIFACT: 2.0-2.05 measured), and what the
# serving registry itself holds (~80 MiB measured after its imports; with room for its gRPC server,
# SQLite and NATS buffers).
REGISTRY_PEAK_OVER_ARTIFACT = 2.25
REGISTRY_SERVING_BYTES = 256 << 20

VALUE_SETS = {
    "defaults": {},
    "production": {
        "image": {"repository": "registry.example.com/cnei", "tag": "1.2.3"},
        "otel": {"endpoint": "http://otel-collector.observability:4317"},
        "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                       "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "CNEI"}}},
        "registry": {"maxArtifactBytes": 536870912, "concurrentChecks": 2, "restrictedApisSecret": {"name": "cnei-admin"},
                     "tls": {"secretName": "cnei-registry-tls", "caSecretName": "cnei-registry-ca",
                             "clientCaKey": "ca.crt", "clientSecretName": "cnei-registry-client"},
                     "persistence": {"storageClass": "fast-ssd"}},
        "registryHeadersSecret": {"name": "cnei-admin", "key": "registry-headers"},
        "runtimeRestrictedApisSecret": {"name": "cnei-nodes"},
        "nodeHeadersSecret": {"name": "cnei-nodes"},
        "trainer": {"restrictedApisSecret": {"name": "cnei-trainer", "key": "apis"},
                    "tls": {"secretName": "cnei-trainer-tls"}},
        "coordinator": {"env": {"CNEI_COORDINATOR_MAX_ATTEMPTS": 5},
                        "restrictedApisSecret": {"name": "cnei-admin", "key": "restricted-apis"},
                        "tls": {"secretName": "cnei-public-tls", "clientCaKey": "ca.crt"},
                        "autoscaling": {"behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}},
        "runtime": {"preload": ["digits", "digits:1:INT8"],
                    "tls": {"secretName": "cnei-runtime-tls", "clientCaKey": "ca.crt", "serverName": "runtime.cnei",
                            "caSecretName": "cnei-runtime-ca", "clientSecretName": "cnei-runtime-client"}},
        "edgeRuntime": {"region": "site-a", "nodeSelector": {"cnei.io/site": "site-a"},
                        "env": {"CNEI_RUNTIME_INTRA_OP_THREADS": 2}},
        "cloudRuntime": {"useCuda": True, "env": {"CNEI_RUNTIME_INFERENCE_WORKERS": 4}},
    },
    "external-deps": {
        "nats": {"enabled": False, "url": "nats://nats.messaging:4222"},
        "redis": {"enabled": False, "url": "redis://redis.state:6379/1"},
        "coordinator": {"autoscaling": {"enabled": False}, "replicas": 3},
        "registry": {"persistence": {"existingClaim": "cnei-registry-restored"}},
        "trainer": {"enabled": False},
        "cloudRuntime": {"enabled": False},
    },
    "single-nats": {"nats": {"replicas": 1}, "edgeNodes": {"cloudExpressions": []}},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _min_kube_version() -> str:
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    return re.search(r">=\s*v?(\d+\.\d+)", constraint).group(1) + ".0"


KUBE_VERSIONS = (_min_kube_version(), kubernetes_validate.latest_version())


@dataclasses.dataclass
class Rendered:
    values: dict  # the chart's defaults merged with the set's overrides
    objects: list[dict]

    def of(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        (found,) = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        return found

    def workloads(self) -> list[dict]:
        return [o for o in self.objects if o["kind"] in WORKLOADS]

    def cnei_containers(self) -> list[tuple[dict, dict]]:
        """(workload, container) for every container running the CNEI image."""
        image = self.values["image"]["repository"] + ":"
        return [(w, c) for w in self.workloads() for c in _pod(w)["containers"]
                if c["image"].startswith(image)]

    def running(self, module: str) -> list[tuple[dict, dict]]:
        """(workload, container) for every CNEI container running `python -m module`."""
        return [(w, c) for w, c in self.cnei_containers() if c.get("args") == [module]]


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _render(overrides: dict) -> Rendered:
    with helm.Chart.load(CHART) as chart:
        values = _merge(chart.values, overrides)
        manifests = chart.render(overrides, name=RELEASE, namespace=NAMESPACE)
    objects = [doc for path, text in sorted(manifests.items()) if path.endswith((".yaml", ".yml"))
               for doc in yaml.safe_load_all(text) if doc]
    return Rendered(values, objects)


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request) -> Rendered:
    return _render(VALUE_SETS[request.param])


@pytest.fixture(scope="module")
def defaults() -> Rendered:
    return _render({})


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _settings(container: dict) -> tuple[object, type, str] | None:
    """(settings object loaded from the container's env, settings class, prefix) or None."""
    if container.get("command") or not container.get("args"):
        return None
    cls, prefix = SETTINGS[container["args"][0]]
    # Downward-API values (pod IP, node name) are strings known only in the cluster.
    env = {name: e.get("value", "from-downward-api") for name, e in _env(container).items()}
    return cfg.load(cls, prefix, env), cls, prefix


def _container_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _required_terms(pod: dict) -> list[dict]:
    affinity = pod.get("affinity", {}).get("nodeAffinity", {})
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {})
    return required.get("nodeSelectorTerms", [])


# --- the chart as Helm and the API server see it ---------------------------------------------

@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_the_chart_lints_without_warnings_at_its_minimum_kubernetes_version(value_set):
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSIONS[0]}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_rendered_object_matches_the_kubernetes_schema(rendered, kube_version):
    failures = []
    for obj in rendered.objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            failures.append(f"{where}: {exc.message} at {list(exc.path)}")
    assert not failures, "\n".join(failures)


def test_custom_resources_are_only_well_formed_service_monitors(rendered):
    custom = [o for o in rendered.objects if (o["apiVersion"], o["kind"]) in CUSTOM_KINDS]
    for monitor in custom:
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert spec["selector"]["matchLabels"] and spec["endpoints"]
        for endpoint in spec["endpoints"]:
            assert isinstance(endpoint["port"], str) and endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def test_object_names_are_unique_dns_names(rendered):
    keys = [(o["kind"], o["metadata"]["name"]) for o in rendered.objects]
    assert len(keys) == len(set(keys))
    for kind, name in keys:
        limit = 63 if kind in {"Service", "StatefulSet", "DaemonSet", "Deployment"} else 253
        assert len(name) <= limit and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), (kind, name)


# --- placement: edge runtimes on edge nodes, everything else off them ------------------------

def test_the_edge_runtime_daemonset_runs_on_edge_nodes_and_tolerates_the_edge_taint(rendered):
    (daemonset,) = rendered.of("DaemonSet")
    pod = _pod(daemonset)
    terms = _required_terms(pod)
    assert {"key": EDGE_LABEL, "operator": "Exists"} in [e for t in terms for e in t["matchExpressions"]]
    assert any(t.get("key") == EDGE_LABEL and t.get("operator") == "Exists"
               and t.get("effect") == "NoSchedule" for t in pod["tolerations"])
    assert pod.get("nodeSelector", {}) == rendered.values["edgeRuntime"]["nodeSelector"]
    (container,) = pod["containers"]
    assert _settings(container)[0].tier == "edge"


def test_cloud_side_workloads_stay_off_edge_nodes_unless_allowed(rendered):
    avoid = rendered.values["edgeNodes"]["cloudExpressions"]
    for workload in rendered.workloads():
        if workload["kind"] == "DaemonSet":
            continue
        terms = _required_terms(_pod(workload))
        if avoid:
            assert terms and all({"key": EDGE_LABEL, "operator": "DoesNotExist"} in t["matchExpressions"]
                                 for t in terms), workload["metadata"]["name"]
        else:
            assert not terms
        assert not any(t.get("key") == EDGE_LABEL for t in _pod(workload).get("tolerations", []))


# --- scaling ---------------------------------------------------------------------------------

def test_the_hpa_scales_the_coordinator_deployment_on_cpu(rendered):
    scaling = rendered.values["coordinator"]["autoscaling"]
    ((coordinator, container),) = rendered.running("services.coordinator")
    hpas = rendered.of("HorizontalPodAutoscaler")
    if not scaling["enabled"]:
        assert not hpas and coordinator["spec"]["replicas"] == rendered.values["coordinator"]["replicas"]
        return
    (hpa,) = hpas
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": coordinator["metadata"]["name"]}
    assert coordinator["kind"] == "Deployment" and "replicas" not in coordinator["spec"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    target = scaling["targetCPUUtilizationPercentage"]
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": target}
    assert container["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"


# --- every container ------------------------------------------------------------------------

def test_every_container_runs_non_root_without_privileges_and_with_limits(rendered):
    for workload in rendered.workloads():
        pod = _pod(workload)
        for container in pod["containers"]:
            sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            assert sc["runAsNonRoot"] is True and sc.get("runAsUser", 0) > 0, container["name"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            assert container.get("livenessProbe") and container.get("readinessProbe"), container["name"]


def test_every_cnei_data_dir_is_a_volume_its_non_root_user_can_write(rendered):
    """The root filesystem is read-only: each `*_dir` a service writes is a mounted volume, and
    the pod's fsGroup (the user's group) makes Kubernetes hand it to that group, writable."""
    checked = 0
    for workload, container in rendered.cnei_containers():
        loaded = _settings(container)
        if loaded is None:
            continue
        settings, pod = loaded[0], _pod(workload)
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        user = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        for f in dataclasses.fields(settings):
            path = getattr(settings, f.name)
            if f.name.endswith("_dir") and path:
                where = (workload["metadata"]["name"], f.name, path)
                assert path in mounts, where
                assert pod["securityContext"].get("fsGroup") == user["runAsGroup"], where
                checked += 1
    assert checked >= 2  # the registry's data and the runtimes' caches, the trainer's when enabled


def test_every_cnei_grpc_server_is_probed_through_grpc_health_on_its_port(rendered):
    """Through gRPC health, or a TCP connect where the port serves TLS (Kubernetes' gRPC probe
    speaks plaintext)."""
    servers = 0
    for workload, container in rendered.cnei_containers():
        ports = _container_ports(container)
        if "grpc" not in ports:
            continue
        servers += 1
        on_tls = _on_tls(container)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            where = (workload["metadata"]["name"], probe)
            if on_tls and container["args"] == ["services.registry"]:
                command = container[probe]["exec"]["command"]
                assert command[:4] == [*HEALTHCHECK, f"127.0.0.1:{ports['grpc']}"], where
            else:
                assert container[probe]["tcpSocket" if on_tls else "grpc"] == {"port": ports["grpc"]}, where
    assert servers >= 3


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_the_registry_on_tls_is_probed_as_its_clients_reach_it_with_files_mounted_in_its_pod():
    """Its clients' CA and certificate (registry.tls.caSecretName, clientSecretName) and the name
    they check (the registry Service's), the files under the container's own mounts."""
    rendered = _render(VALUE_SETS["production"])
    ((_, registry),) = rendered.running("services.registry")
    ((_, coordinator),) = rendered.running("services.coordinator")
    command = registry["readinessProbe"]["exec"]["command"]
    assert _option(command, "--tls-server-name") == _settings(coordinator)[0].registry_target.rsplit(":", 1)[0]
    client_env = _env(coordinator)
    mounts = {m["mountPath"] for m in registry["volumeMounts"]}
    for option, variable in (("--tls-ca", "CNEI_COORDINATOR_REGISTRY_TLS_CA_FILE"),
                             ("--tls-cert", "CNEI_COORDINATOR_REGISTRY_TLS_CERT_FILE"),
                             ("--tls-key", "CNEI_COORDINATOR_REGISTRY_TLS_KEY_FILE")):
        path = _option(command, option)
        assert path == client_env[variable]["value"] and str(Path(path).parent) in mounts, option
    assert all(registry[p]["exec"] == registry["readinessProbe"]["exec"] for p in ("startupProbe", "livenessProbe"))


async def _probe(command: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(sys.executable, *command[1:], cwd=ROOT,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), timeout=30)


async def test_the_registry_tls_probe_passes_on_a_serving_registry_on_mutual_tls_and_fails_on_one_not_serving(
        tmp_path):
    rendered = _render(VALUE_SETS["production"])
    ((_, registry),) = rendered.running("services.registry")
    command = registry["readinessProbe"]["exec"]["command"]
    pki = make_pki(tmp_path, names=(_option(command, "--tls-server-name"),))
    files = {_option(command, "--tls-ca"): pki["ca"], _option(command, "--tls-cert"): pki["client_cert"],
             _option(command, "--tls-key"): pki["client_key"]}
    server_tls = cnei_tls.server_tls("CNEI_REGISTRY_", pki["named_cert"], pki["named_key"], pki["ca"])
    server = GrpcServer("127.0.0.1", 0, credentials=cnei_tls.grpc_server_credentials(server_tls))
    await server.start()
    try:
        local = [files.get(arg, arg) for arg in command]
        local[local.index(f"127.0.0.1:{rendered.values['registry']['port']}")] = server.address
        assert await _probe(local) == 0
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await _probe(local) == 1
    finally:
        await server.stop(0)


def test_cnei_env_vars_are_fields_of_the_service_settings_with_valid_values(rendered):
    for workload, container in rendered.cnei_containers():
        loaded = _settings(container)
        names = set(_env(container))
        if loaded is None:
            assert names <= TELEMETRY_VARS, workload["metadata"]["name"]
            continue
        _, cls, prefix = loaded
        fields = {f"{prefix}{f.name.upper()}" for f in dataclasses.fields(cls)}
        assert names - TELEMETRY_VARS <= fields, names - TELEMETRY_VARS - fields
        assert len(container["env"]) == len(names), "duplicate env entries"


def test_restricted_apis_come_from_a_secret_only_when_one_is_named():
    admin = {"name": "cnei-admin", "key": "restricted-apis"}
    headers = {"name": "cnei-admin", "key": "registry-headers"}
    expected = {  # (module, variable): the secret the production values name
        ("services.coordinator", "CNEI_COORDINATOR_RESTRICTED_APIS"): admin,
        ("services.registry", "CNEI_REGISTRY_RESTRICTED_APIS"): admin,  # the key defaults to restricted-apis
        ("services.trainer", "CNEI_TRAINER_RESTRICTED_APIS"): {"name": "cnei-trainer", "key": "apis"},
        ("services.coordinator", "CNEI_COORDINATOR_REGISTRY_HEADERS"): headers,
        ("services.trainer", "CNEI_TRAINER_REGISTRY_HEADERS"): headers,
        ("services.edge_runtime", "CNEI_RUNTIME_REGISTRY_HEADERS"): headers,
        # a runtime's internal planes, and the keys its callers send (the keys' default names)
        ("services.edge_runtime", "CNEI_RUNTIME_RESTRICTED_APIS"): {"name": "cnei-nodes", "key": "runtime-restricted-apis"},
        ("services.coordinator", "CNEI_COORDINATOR_NODE_HEADERS"): {"name": "cnei-nodes", "key": "node-headers"},
        ("services.trainer", "CNEI_TRAINER_NODE_HEADERS"): {"name": "cnei-nodes", "key": "node-headers"},
    }
    for value_set in ("production", "defaults"):
        rendered = _render(VALUE_SETS[value_set])
        for (module, variable), secret in expected.items():
            containers = rendered.running(module)
            assert containers, module
            for _, container in containers:  # the edge daemonset and the cloud runtime alike
                env = _env(container).get(variable)
                assert (env["valueFrom"]["secretKeyRef"] if env else None) == (secret if value_set == "production" else None)


def test_the_public_ports_serve_tls_from_a_secret_and_are_probed_over_tcp_then():
    for value_set, tls in (("production", True), ("defaults", False)):
        (workload, container), = _render(VALUE_SETS[value_set]).running("services.coordinator")
        env = _env(container)
        files = {name: env[name]["value"] for name in ("CNEI_COORDINATOR_TLS_CERT_FILE", "CNEI_COORDINATOR_TLS_KEY_FILE",
                                                       "CNEI_COORDINATOR_TLS_CLIENT_CA_FILE") if name in env}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        probe = container["readinessProbe"]
        if tls:
            assert files == {"CNEI_COORDINATOR_TLS_CERT_FILE": "/etc/cnei/tls/tls.crt",
                             "CNEI_COORDINATOR_TLS_KEY_FILE": "/etc/cnei/tls/tls.key",
                             "CNEI_COORDINATOR_TLS_CLIENT_CA_FILE": "/etc/cnei/tls/ca.crt"}
            assert volumes["tls"]["secret"]["secretName"] == "cnei-public-tls"
            assert {"name": "tls", "mountPath": "/etc/cnei/tls", "readOnly": True} in container["volumeMounts"]
            assert "tcpSocket" in probe and "grpc" not in probe
        else:
            assert files == {} and "tls" not in volumes and "grpc" in probe


def _volumes(workload: dict) -> dict[str, dict]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}


def _serves_tls(workload: dict, container: dict, prefix: str, secret: str, client_ca: bool) -> None:
    """The container serves TLS from `secret` mounted at /etc/cnei/tls (`client_ca`: and requires
    client certificates), probed over TCP or by the image's health check over TLS."""
    env, volumes = _env(container), _volumes(workload)
    assert env[f"{prefix}TLS_CERT_FILE"]["value"] == "/etc/cnei/tls/tls.crt"
    assert env[f"{prefix}TLS_KEY_FILE"]["value"] == "/etc/cnei/tls/tls.key"
    if client_ca:
        assert env[f"{prefix}TLS_CLIENT_CA_FILE"]["value"] == "/etc/cnei/tls/ca.crt"
    assert volumes["tls"]["secret"]["secretName"] == secret
    probe = container["readinessProbe"]
    assert "tcpSocket" in probe or probe["exec"]["command"][:3] == HEALTHCHECK


def _serves_plaintext(workload: dict, container: dict, prefix: str) -> None:
    assert f"{prefix}TLS_CERT_FILE" not in _env(container) and "tls" not in _volumes(workload)


def _trusts(workload: dict, container: dict, prefix: str, kind: str, what: str, secrets: tuple[str, str, str]) -> None:
    """A client trusts servers on TLS as the chart hands it: the CA from a Secret of its own under
    /etc/cnei/<what>-ca (never the serving Secret), its client certificate under <what>-client.
    `secrets`: (serving, CA-only, client certificate) Secret names; `kind`: REGISTRY or NODE."""
    env, volumes = _env(container), _volumes(workload)
    serving, ca_only, client = secrets
    assert env[f"{prefix}{kind}_TLS_CA_FILE"]["value"] == f"/etc/cnei/{what}-ca/ca.crt"
    assert env[f"{prefix}{kind}_TLS_CERT_FILE"]["value"] == f"/etc/cnei/{what}-client/tls.crt"
    assert env[f"{prefix}{kind}_TLS_KEY_FILE"]["value"] == f"/etc/cnei/{what}-client/tls.key"
    assert volumes[f"{what}-ca"]["secret"] == {"secretName": ca_only, "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert volumes[f"{what}-client"]["secret"] == {"secretName": client}
    assert serving not in str(volumes)
    assert {"name": f"{what}-ca", "mountPath": f"/etc/cnei/{what}-ca", "readOnly": True} in container["volumeMounts"]


def test_the_registry_serves_tls_from_a_secret_and_its_clients_get_the_ca_alone():
    for value_set, tls in (("production", True), ("defaults", False)):
        rendered = _render(VALUE_SETS[value_set])
        (workload, container), = rendered.running("services.registry")
        if tls:
            _serves_tls(workload, container, "CNEI_REGISTRY_", "cnei-registry-tls", client_ca=True)
        else:
            _serves_plaintext(workload, container, "CNEI_REGISTRY_")
        for module, prefix in (("services.coordinator", "CNEI_COORDINATOR_"), ("services.edge_runtime", "CNEI_RUNTIME_"),
                               ("services.trainer", "CNEI_TRAINER_")):
            for client, client_container in rendered.running(module):
                if tls:
                    _trusts(client, client_container, prefix, "REGISTRY", "registry",
                            ("cnei-registry-tls", "cnei-registry-ca", "cnei-registry-client"))
                else:
                    assert _env(client_container).get(f"{prefix}REGISTRY_TLS_CA_FILE") is None
                    assert "registry-ca" not in _volumes(client)


def test_the_trainer_serves_tls_from_a_secret():
    for value_set, tls in (("production", True), ("defaults", False)):
        (workload, container), = _render(VALUE_SETS[value_set]).running("services.trainer")
        if tls:
            _serves_tls(workload, container, "CNEI_TRAINER_", "cnei-trainer-tls", client_ca=False)
        else:
            _serves_plaintext(workload, container, "CNEI_TRAINER_")


def test_runtimes_serve_tls_from_a_secret_and_their_clients_check_the_server_name():
    for value_set, tls in (("production", True), ("defaults", False)):
        rendered = _render(VALUE_SETS[value_set])
        runtimes = rendered.running("services.edge_runtime")
        assert len(runtimes) == 2  # the edge DaemonSet and the cloud Deployment
        for workload, container in runtimes:
            if tls:
                _serves_tls(workload, container, "CNEI_RUNTIME_", "cnei-runtime-tls", client_ca=True)
            else:
                _serves_plaintext(workload, container, "CNEI_RUNTIME_")
                assert "grpc" in container["readinessProbe"]
        for module, prefix in (("services.coordinator", "CNEI_COORDINATOR_"), ("services.trainer", "CNEI_TRAINER_")):
            (client, client_container), = rendered.running(module)
            env = _env(client_container)
            if tls:  # and the name checked in the runtimes' certificate
                _trusts(client, client_container, prefix, "NODE", "node",
                        ("cnei-runtime-tls", "cnei-runtime-ca", "cnei-runtime-client"))
                assert env[f"{prefix}NODE_TLS_SERVER_NAME"]["value"] == "runtime.cnei"
            else:
                assert not any(name.startswith(f"{prefix}NODE_TLS") for name in env) and "node-ca" not in _volumes(client)
    services = {d["metadata"]["name"]: d for d in _render(VALUE_SETS["production"]).of("Service")}
    assert {p["appProtocol"] for name, svc in services.items() if "runtime" in name
            for p in svc["spec"]["ports"] if p["name"] == "grpc"} == {"https"}


@pytest.mark.parametrize(("tls", "message"), [
    ({"secretName": "cnei-registry-tls"}, "registry.tls.caSecretName"),
    ({"secretName": "cnei-registry-tls", "caSecretName": "ca", "clientCaKey": "ca.crt"}, "registry.tls.clientSecretName"),
])
def test_a_registry_tls_set_up_its_clients_could_not_use_is_refused(tls, message):
    with pytest.raises(Exception, match=message):
        _render({"registry": {"tls": tls}})


@pytest.mark.parametrize(("tls", "message"), [
    ({"secretName": "cnei-runtime-tls", "serverName": "runtime.cnei"}, "runtime.tls.caSecretName"),
    ({"secretName": "cnei-runtime-tls", "caSecretName": "ca"}, "runtime.tls.serverName"),
    ({"secretName": "cnei-runtime-tls", "caSecretName": "ca", "serverName": "runtime.cnei", "clientCaKey": "ca.crt"},
     "runtime.tls.clientSecretName"),
])
def test_a_runtime_tls_set_up_its_clients_could_not_use_is_refused(tls, message):
    with pytest.raises(Exception, match=message):
        _render({"runtime": {"tls": tls}})
    with pytest.raises(Exception, match=message):  # the clients check it too, with no runtime in the release
        _render({"runtime": {"tls": tls}, "edgeRuntime": {"enabled": False}, "cloudRuntime": {"enabled": False}})


def test_settings_ports_match_the_container_ports(rendered):
    for workload, container in rendered.cnei_containers():
        loaded = _settings(container)
        if loaded is None:
            continue
        settings = loaded[0]
        assert settings.host == "0.0.0.0"
        expected = {port_name: getattr(settings, f) for f, port_name in PORT_FIELDS.items()
                    if hasattr(settings, f)}
        assert _container_ports(container) == expected, workload["metadata"]["name"]


def test_the_otel_endpoint_and_image_come_from_values(rendered):
    image = rendered.values["image"]
    tag = image["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    containers = rendered.cnei_containers()
    assert containers
    for _, container in containers:
        assert container["image"] == f"{image['repository']}:{tag}"
        endpoint = _env(container)["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]
        assert endpoint == rendered.values["otel"]["endpoint"]


# --- wiring: Services, addresses, runtimes ----------------------------------------------------

def test_every_service_selects_one_workload_exposing_its_target_ports(rendered):
    for service in rendered.of("Service"):
        selector = service["spec"]["selector"]
        matches = [w for w in rendered.workloads()
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, service["metadata"]["name"]
        ports = {name for c in _pod(matches[0])["containers"] for name in _container_ports(c)}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


# The app protocol of each named CNEI Service port, when its server is on plaintext and on TLS
# (metrics are always plain HTTP).
APP_PROTOCOLS = {"grpc": ("kubernetes.io/h2c", "https"), "http": ("http", "https"), "metrics": ("http", "http")}


def _on_tls(container: dict) -> bool:
    """Whether the CNEI server in `container` serves TLS."""
    return bool(SERVER_TLS_VARS & set(_env(container)))


def test_every_cnei_service_port_names_the_app_protocol_its_server_speaks(rendered):
    checked = 0
    for workload, container in rendered.cnei_containers():
        labels = workload["spec"]["template"]["metadata"]["labels"].items()
        for service in rendered.of("Service"):
            if not service["spec"]["selector"].items() <= labels:
                continue
            for port in service["spec"]["ports"]:
                expected = APP_PROTOCOLS[port["name"]][_on_tls(container)]
                where = (service["metadata"]["name"], port["name"])
                assert port.get("appProtocol", "http") == expected, where
                checked += 1
    assert checked >= 8

def _service_port(rendered: Rendered, host: str, port: int) -> bool:
    return any(s["metadata"]["name"] == host and port in [p["port"] for p in s["spec"]["ports"]]
               for s in rendered.of("Service"))


def test_dialled_addresses_are_services_of_the_release_or_the_external_urls(rendered):
    for workload, container in rendered.cnei_containers():
        loaded = _settings(container)
        if loaded is None:
            continue
        settings = loaded[0]
        if hasattr(settings, "registry_target"):
            host, port = settings.registry_target.rsplit(":", 1)
            assert _service_port(rendered, host, int(port))
        for dep in ("nats", "redis"):
            if not hasattr(settings, f"{dep}_url"):
                continue
            url = getattr(settings, f"{dep}_url")
            if rendered.values[dep]["enabled"]:
                parsed = urlparse(url)
                assert _service_port(rendered, parsed.hostname, parsed.port), url
            else:
                assert url == rendered.values[dep]["url"]


def test_runtimes_advertise_their_pod_ip_under_a_unique_node_id(rendered):
    node_id_source = {"DaemonSet": "spec.nodeName", "Deployment": "metadata.name"}
    runtimes = rendered.running("services.edge_runtime")
    assert runtimes
    for workload, container in runtimes:
        env = _env(container)
        assert env["CNEI_RUNTIME_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert (env["CNEI_RUNTIME_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
                == node_id_source[workload["kind"]])
        settings = _settings(container)[0]
        tier = "edge" if workload["kind"] == "DaemonSet" else "cloud"
        assert settings.tier == tier and settings.region == rendered.values[f"{tier}Runtime"]["region"]
        assert settings.preload == tuple(rendered.values["runtime"]["preload"])
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert settings.cache_dir in mounts


def test_each_tier_heartbeats_as_its_values_say_and_the_runtime_accepts_them(rendered):
    """Edge sites get longer heartbeats than the cloud (slow links to Redis); whatever is set,
    the runtime's own start-up check passes."""
    runtimes = rendered.running("services.edge_runtime")
    for workload, container in runtimes:
        settings = _settings(container)[0]
        tier = "edge" if workload["kind"] == "DaemonSet" else "cloud"
        beat = rendered.values[f"{tier}Runtime"]["heartbeat"]
        assert (settings.heartbeat_interval_s, settings.heartbeat_ttl_s) == (beat["intervalS"], beat["ttlS"])
        check_heartbeat(runtime_settings.PREFIX, settings)
    edge, cloud = (rendered.values[f"{t}Runtime"]["heartbeat"] for t in ("edge", "cloud"))
    assert edge["ttlS"] > cloud["ttlS"]


@pytest.mark.parametrize("beat", [{"intervalS": 3, "ttlS": 3}, {"intervalS": 0, "ttlS": 3}])
def test_heartbeats_that_cannot_keep_a_node_record_alive_fail_to_render(beat):
    with pytest.raises(Exception, match=r"edgeRuntime.heartbeat.intervalS \(.*\) must be above 0 and below ttlS"):
        _render({"edgeRuntime": {"heartbeat": beat}})


@pytest.mark.parametrize("tier", ["edge", "cloud"])
def test_heartbeats_set_through_env_too_are_refused_not_doubled(tier):
    with pytest.raises(Exception, match=f"{tier}Runtime.env sets CNEI_RUNTIME_HEARTBEAT_\\*: use {tier}Runtime.heartbeat"):
        _render({f"{tier}Runtime": {"env": {"CNEI_RUNTIME_HEARTBEAT_TTL_S": 5}}})


QUANTITY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                  "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity_bytes(quantity: str) -> int:
    """Bytes of a Kubernetes quantity such as 10Gi or 500M."""
    number, unit = re.fullmatch(r"(\d+)([kMGT]i?|Ki)?", str(quantity)).groups()
    return int(number) * QUANTITY_UNITS[unit or ""]


def _cache_budgets(rendered: Rendered) -> dict[str, tuple[int, int]]:
    """Per tier: (the runtime's disk cache budget, the sizeLimit of the volume its cache dir is on)."""
    budgets = {}
    for workload, container in rendered.running("services.edge_runtime"):
        settings = _settings(container)[0]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == settings.cache_dir]
        (volume,) = [v for v in _pod(workload)["volumes"] if v["name"] == mount["name"]]
        tier = "edge" if workload["kind"] == "DaemonSet" else "cloud"
        budgets[tier] = (settings.disk_cache_max_bytes, _quantity_bytes(volume["emptyDir"]["sizeLimit"]))
    return budgets


def test_each_runtime_keeps_its_disk_cache_under_its_volume_s_size_limit(rendered):
    """The kubelet evicts a pod whose emptyDir outgrows its sizeLimit: the runtime's budget is the
    values' share of it (the rest: its outbox, headroom)."""
    budgets = _cache_budgets(rendered)
    assert budgets
    for tier, (budget, limit) in budgets.items():
        percent = rendered.values[f"{tier}Runtime"]["cache"]["budgetPercent"]
        assert budget == limit * percent // 100 and 0 < budget < limit


@pytest.mark.parametrize("cache, expected", [
    ({"sizeLimit": "512Mi", "budgetPercent": 50}, 256 * 2**20),
    ({"sizeLimit": "3G"}, 2_400_000_000),
    ({"sizeLimit": "2Ti", "budgetPercent": 90}, 2 * 2**40 * 90 // 100),
])
def test_the_disk_cache_budget_follows_the_size_limit_and_share_set(cache, expected):
    assert _cache_budgets(_render({"edgeRuntime": {"cache": cache}}))["edge"] == (expected, _quantity_bytes(
        cache["sizeLimit"]))


@pytest.mark.parametrize("cache, message", [
    ({"budgetPercent": 100}, r"edgeRuntime.cache.budgetPercent \(100\) must be above 0 and below 100"),
    ({"budgetPercent": 0}, r"edgeRuntime.cache.budgetPercent \(0\) must be above 0 and below 100"),
    ({"sizeLimit": "1.5Gi"}, r"edgeRuntime.cache.sizeLimit \(1.5Gi\) must be a whole number of bytes"),
])
def test_a_disk_cache_budget_that_would_not_stay_under_the_size_limit_fails_to_render(cache, message):
    with pytest.raises(Exception, match=message):
        _render({"edgeRuntime": {"cache": cache}})


@pytest.mark.parametrize("tier", ["edge", "cloud"])
def test_a_disk_cache_budget_set_through_env_is_refused_not_doubled(tier):
    with pytest.raises(Exception, match=f"{tier}Runtime.env sets CNEI_RUNTIME_DISK_CACHE_MAX_BYTES: use "
                                        f"{tier}Runtime.cache.budgetPercent"):
        _render({f"{tier}Runtime": {"env": {"CNEI_RUNTIME_DISK_CACHE_MAX_BYTES": 5}}})


# --- state: registry volume, NATS cluster, Redis AOF ------------------------------------------

def test_the_registry_keeps_its_data_dir_on_a_persistent_volume(rendered):
    ((registry, container),) = rendered.running("services.registry")
    assert registry["spec"]["replicas"] == 1 and registry["spec"]["strategy"]["type"] == "Recreate"
    pod = _pod(registry)
    data_dir = _settings(container)[0].data_dir
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    existing = rendered.values["registry"]["persistence"]["existingClaim"]
    if existing:
        assert claim == existing and not rendered.of("PersistentVolumeClaim")
    else:
        pvc = rendered.get("PersistentVolumeClaim", claim)
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def _memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (plain bytes, or with a k/M/G/T or Ki/Mi/Gi/Ti suffix) in bytes."""
    number, suffix = re.fullmatch(r"(\d+)([kMGT]i?)?", str(quantity)).groups()
    if not suffix:
        return int(number)
    base = 1024 if suffix.endswith("i") else 1000
    return int(number) * base ** ("kMGT".index(suffix[0]) + 1)


def test_the_registry_memory_limit_covers_checking_the_largest_artifact_it_accepts_in_each_concurrent_check(
        rendered):
    """Checking a pushed artifact grows the registry's memory by up to REGISTRY_PEAK_OVER_ARTIFACT ×
    its size, on top of what the serving registry holds, and CONCURRENT_CHECKS pushes check at
    once: a limit below that OOM-kills it mid-push."""
    ((_, container),) = rendered.running("services.registry")
    settings = _settings(container)[0]
    largest, checks = settings.max_artifact_bytes, settings.concurrent_checks
    assert (largest, checks) == (rendered.values["registry"]["maxArtifactBytes"],
                                 rendered.values["registry"]["concurrentChecks"])
    limit = _memory_bytes(container["resources"]["limits"]["memory"])
    assert limit >= checks * REGISTRY_PEAK_OVER_ARTIFACT * largest + REGISTRY_SERVING_BYTES, (limit, checks, largest)


def test_nats_is_a_jetstream_cluster_routed_through_its_headless_service(rendered):
    if not rendered.values["nats"]["enabled"]:
        assert not [s for s in rendered.of("StatefulSet") if "nats" in s["metadata"]["name"]]
        return
    (nats,) = [s for s in rendered.of("StatefulSet") if _pod(s)["containers"][0]["name"] == "nats"]
    replicas = rendered.values["nats"]["replicas"]
    assert nats["spec"]["replicas"] == replicas
    headless = rendered.get("Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    (config,) = [v["configMap"]["name"] for v in _pod(nats)["volumes"] if "configMap" in v]
    conf = rendered.get("ConfigMap", config)["data"]["nats.conf"]
    assert re.search(r"jetstream\s*\{[^}]*store_dir:\s*/data", conf)
    assert {"name": "data", "mountPath": "/data"} in _pod(nats)["containers"][0]["volumeMounts"]
    assert [t["metadata"]["name"] for t in nats["spec"]["volumeClaimTemplates"]] == ["data"]
    routes = re.findall(r"nats://([^:\s]+):6222", conf)
    name, service = nats["metadata"]["name"], headless["metadata"]["name"]
    domain = f"{NAMESPACE}.svc.{rendered.values['clusterDomain']}"
    if replicas > 1:
        assert routes == [f"{name}-{i}.{service}.{domain}" for i in range(replicas)]
        assert "cluster {" in conf
    else:
        assert not routes and "cluster {" not in conf


def test_nats_accepts_the_rendered_configuration(rendered, tmp_path):
    servers = [s for s in rendered.of("StatefulSet") if _pod(s)["containers"][0]["name"] == "nats"]
    if not servers:
        pytest.skip("NATS is external in this value set")
    (nats,) = servers
    (config,) = [v["configMap"]["name"] for v in _pod(nats)["volumes"] if "configMap" in v]
    conf = tmp_path / "nats.conf"
    conf.write_text(rendered.get("ConfigMap", config)["data"]["nats.conf"])
    env = {"SERVER_NAME": f"{nats['metadata']['name']}-0"}
    # -t parses and checks the configuration (unknown fields, variables, sizes) and exits.
    result = subprocess.run([infra.find_binary("nats-server"), "-t", "-c", str(conf)], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_redis_persists_with_the_append_only_file(rendered):
    if not rendered.values["redis"]["enabled"]:
        assert not [s for s in rendered.of("StatefulSet") if "redis" in s["metadata"]["name"]]
        return
    (server,) = [s for s in rendered.of("StatefulSet") if _pod(s)["containers"][0]["name"] == "redis"]
    (container,) = _pod(server)["containers"]
    command = container["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    data_dir = command[command.index("--dir") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    assert mount["name"] in [t["metadata"]["name"] for t in server["spec"]["volumeClaimTemplates"]]


def test_redis_starts_with_the_rendered_command_and_passes_its_readiness_probe(defaults, tmp_path):
    (redis_set,) = [s for s in defaults.of("StatefulSet") if _pod(s)["containers"][0]["name"] == "redis"]
    (container,) = _pod(redis_set)["containers"]
    command, port = list(container["command"]), infra.free_port()
    command[0] = infra.find_binary("redis-server")
    command[command.index("--port") + 1] = str(port)
    command[command.index("--dir") + 1] = str(tmp_path)
    probe = container["readinessProbe"]["exec"]["command"]
    probe = [part.replace("-p 6379", f"-p {port}") for part in probe]
    proc = subprocess.Popen([*command, "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
    try:
        infra.wait_for_port("127.0.0.1", port, proc=proc)
        env = {"PATH": f"{Path(infra.find_binary('redis-cli')).parent}:/usr/bin:/bin"}
        assert subprocess.run(probe, env=env, timeout=10).returncode == 0
        client = redis.Redis(port=port)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
    finally:
        infra.stop(proc)


# --- monitoring and the trainer ---------------------------------------------------------------

def test_the_service_monitor_scrapes_the_metrics_port_of_every_cnei_service(rendered):
    monitors = rendered.of("ServiceMonitor")
    if not rendered.values["monitoring"]["serviceMonitor"]["enabled"]:
        assert not monitors
        return
    (monitor,) = monitors
    extra_labels = rendered.values["monitoring"]["serviceMonitor"]["labels"]
    assert monitor["metadata"]["labels"].items() >= extra_labels.items()
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [s for s in rendered.of("Service") if wanted <= s["metadata"]["labels"].items()]
    with_metrics = [s for s in rendered.of("Service")
                    if "metrics" in [p["name"] for p in s["spec"]["ports"]]]
    assert selected == with_metrics and len(selected) >= 3
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_the_grafana_dashboard_is_a_config_map_the_grafana_sidecar_picks_up(rendered):
    wanted = rendered.values["monitoring"]["grafanaDashboard"]
    maps = [c for c in rendered.of("ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]]
    if not wanted["enabled"]:
        assert not maps
        return
    (dashboard,) = maps
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"].get("annotations", {}) == wanted["annotations"]
    (text,) = dashboard["data"].values()
    assert json.loads(text) == json.loads(CHART_DASHBOARD.read_text())


def test_the_trainer_runs_the_trainer_service_with_a_writable_work_dir(rendered):
    trainers = rendered.running("services.trainer")
    if not rendered.values["trainer"]["enabled"]:
        assert not trainers
        return
    ((workload, container),) = trainers
    assert workload["kind"] == "Deployment"
    settings = _settings(container)[0]
    assert settings.port == rendered.values["trainer"]["port"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(workload)["volumes"]}
    assert "emptyDir" in volumes[mounts[settings.data_dir]]
    service = rendered.get("Service", workload["metadata"]["name"])
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}


@pytest.mark.parametrize("dependency", ["nats", "redis"])
def test_an_external_dependency_without_its_url_fails_to_render(dependency):
    with pytest.raises(helm.HelmRenderError, match=f"{dependency}.url is required"):
        _render({dependency: {"enabled": False}})


@pytest.mark.parametrize(("overrides", "copies"), [({}, "3"), ({"nats": {"replicas": 1}}, "1"),
                                                  ({"nats": {"enabled": False, "url": "nats://nats.example:4222"}}, "1"),
                                                  ({"nats": {"stream": {"replicas": 2}}}, "2")],
                         ids=["cluster-of-3", "single-server", "external-nats", "chosen"])
def test_every_service_makes_the_events_stream_with_the_cluster_s_copies_and_limits(overrides, copies):
    """One copy on a three-server cluster lost every event once the server holding it went (a
    rolling update); the stream keeps at most a week and 1 GiB, under a store below its volume."""
    rendered = _render(overrides)
    containers = [c for _, c in rendered.cnei_containers() if _settings(c) is not None]
    assert containers
    for container in containers:
        settings, _, _ = _settings(container)
        assert (settings.events_stream_replicas, settings.events_max_age_s, settings.events_max_bytes) == (
            int(copies), 604800.0, 1 << 30)
