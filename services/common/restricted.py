"""Triton's restricted APIs (`--grpc-restricted-protocol`, `--http-restricted-api`): categories of
the OIP API answered only to requests that carry a given header with a given value, so that, for
one, anybody may infer while only an operator holding the key unloads models or changes trace
and log settings.

A restriction reads `<category>[,<category>...]:<header>=<value>`, several joined with `;`, e.g.
`model-repository,trace,logging:admin-key=s3cret;shared-memory:shm-key=local`. Categories are
Triton's. A request of a restricted category without the header (or with another value) is
PERMISSION_DENIED over gRPC and 403 over REST; the value is never echoed.

An edge runtime restricts two more things with the same keys: its fast lane (the coordinator's
data plane) takes the `inference` key, which a client sends once per connection (a hello frame,
services/common/fastlane.py), and its NodeControl service (load, unload, status, federated
rounds) the `node-control` category. The coordinator and the trainer send the keys of the
runtimes they call from `CNEI_<SERVICE>_NODE_HEADERS`. The front door's control plane listens on
the loopback interface only: the door's public port answers its calls UNIMPLEMENTED and reflection
does not list it.

The registry and the trainer take the same form for their own APIs, with two of the categories:
`model-repository` for what changes the repository (pushing or deleting a model, recording a
measurement, applying or deleting a deployment; starting a federated job, which publishes a version) and
`metadata` for what reads it (listing, resolving, fetching artifacts, deployments, the deleted
variants' tombstones; jobs).

The standard health and reflection services are in no category, open to every client: health is
what probes ask, and reflection describes the protos (public), never data, while grpcurl needs it
to call even the open methods; each service's `GRPC_REFLECTION` setting turns reflection off."""
from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from services.common.client_settings import env_headers
from services.common.grpc_util import refusing

CATEGORIES = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
              "statistics", "trace", "logging", "node-control")
OIP_SERVICE = "inference.GRPCInferenceService"
GRPC_METHODS = {
    "ServerLive": "health", "ServerReady": "health", "ModelReady": "health",
    "ServerMetadata": "metadata", "ModelMetadata": "metadata",
    "ModelInfer": "inference", "ModelStreamInfer": "inference",
    "ModelConfig": "model-config", "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository", "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory", "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory", "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory", "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace", "LogSettings": "logging",
}
REGISTRY_SERVICE = "cnei.registry.v1.ModelRegistry"
REGISTRY_METHODS = {
    "PushModel": "model-repository", "RecordMeasurement": "model-repository", "PutDeployment": "model-repository",
    "DeleteModel": "model-repository", "DeleteDeployment": "model-repository",
    "ListModels": "metadata", "GetModel": "metadata", "ResolveModel": "metadata", "FetchArtifact": "metadata",
    "GetDeployment": "metadata", "ListDeployments": "metadata", "ListDeleted": "metadata",
}
TRAINER_SERVICE = "cnei.trainer.v1.Trainer"
TRAINER_METHODS = {"StartJob": "model-repository", "GetJob": "metadata", "ListJobs": "metadata",
                   "WatchJob": "metadata"}
NODE_SERVICE = "cnei.node.v1.NodeControl"
NODE_METHODS = {"LoadModel": "node-control", "UnloadModel": "node-control", "GetNodeStatus": "node-control",
                "TrainRound": "node-control"}
# Which categories each kind of server has: {service: {method: category}}
OIP_API = {OIP_SERVICE: GRPC_METHODS}
RUNTIME_API = {OIP_SERVICE: GRPC_METHODS, NODE_SERVICE: NODE_METHODS}
REGISTRY_API = {REGISTRY_SERVICE: REGISTRY_METHODS}
TRAINER_API = {TRAINER_SERVICE: TRAINER_METHODS}
_REST_HEADS = {"health": "health", "repository": "model-repository", "systemsharedmemory": "shared-memory",
               "cudasharedmemory": "shared-memory", "trace": "trace", "logging": "logging"}
_REST_MODEL_TAILS = {"ready": "health", "infer": "inference", "config": "model-config", "stats": "statistics",
                     "trace": "trace"}


@dataclass(frozen=True)
class Key:
    header: str  # lower case, as gRPC metadata keys are
    value: str


def parse(spec: str, categories: tuple[str, ...] = CATEGORIES) -> dict[str, Key]:
    """`spec` -> {category: the header and value it needs}; `categories`: those the server has.
    ValueError naming what is wrong."""
    restricted: dict[str, Key] = {}
    for position, group in enumerate(filter(None, (g.strip() for g in spec.split(";"))), 1):
        names, sep, pair = group.partition(":")
        header, eq, value = pair.partition("=")
        if not sep or not eq or not header.strip() or not value:
            # the group may hold a mistyped secret: named by its place only
            raise ValueError(f"restricted APIs: group {position} (of those joined with ';') must read "
                             "<category>[,<category>...]:<header>=<value>")
        key = Key(header.strip().lower(), value)
        for name in filter(None, (n.strip() for n in names.split(","))):
            if name not in categories:
                raise ValueError(f"restricted APIs: unknown category '{name}'; categories are {', '.join(categories)}")
            if name in restricted:
                raise ValueError(f"restricted APIs: category '{name}' is restricted twice")
            restricted[name] = key
    return restricted


def headers(pairs: list[str] | str) -> list[tuple[str, str]]:
    """`KEY=VALUE` pairs (a list, or one string joined with `;`) -> gRPC metadata for a client
    of a server with restricted APIs. ValueError naming a pair that is not one."""
    items = pairs.split(";") if isinstance(pairs, str) else pairs
    out = []
    for item in filter(None, (i.strip() for i in items)):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():  # the pair may be a mistyped secret: named by its place only
            raise ValueError(f"header {len(out) + 1} must read KEY=VALUE")
        out.append((key.strip().lower(), value))
    return out


def categories_of(api: Mapping[str, Mapping[str, str]]) -> tuple[str, ...]:
    """The categories the methods of `api` fall in, in Triton's order."""
    used = {category for methods in api.values() for category in methods.values()}
    return tuple(c for c in CATEGORIES if c in used)


def client_headers(flags: list[str]) -> list[tuple[str, str]]:
    """A command-line client's headers: its `--header KEY=VALUE` flags, else $CNEI_HEADERS
    (`k=v;k2=v2`), for servers whose APIs are restricted."""
    return headers(flags or env_headers())


def own_headers(spec: str, categories: tuple[str, ...] = CATEGORIES) -> list[tuple[str, str]]:
    """Every header a server restricted by `spec` asks for (what the one who configured it sends)."""
    return sorted({(k.header, k.value) for k in parse(spec, categories).values()})


def rest_category(path: str) -> str | None:
    """The category of a REST path of the OIP API (None: not part of it)."""
    parts = [p for p in path.split("/") if p]
    if not parts or parts[0] != "v2":
        return None
    if len(parts) == 1:
        return "metadata"
    if parts[1] != "models":
        return _REST_HEADS.get(parts[1])
    if parts[2:] == ["stats"]:  # every model's statistics (the server routes it before model "stats")
        return "statistics"
    rest = parts[3:]
    if rest[:1] == ["versions"]:
        rest = rest[2:]
    return _REST_MODEL_TAILS.get(rest[0]) if rest else "metadata"


# Paths beside the OIP API that show what some of its categories guard: the coordinator's status
# JSON holds every model's statistics, the models and the nodes (the page at `/` holds no data)
_REST_BESIDE = {"/api/status": ("metadata", "statistics")}


def rest_categories(path: str) -> tuple[str, ...]:
    """The categories whose keys a REST request of `path` needs: its OIP category, or what a
    path beside the API shows (none: open)."""
    beside = _REST_BESIDE.get("/" + path.strip("/"))
    if beside is not None:
        return beside
    category = rest_category(path)
    return (category,) if category else ()


def _exact_bytes(text: str) -> bytes:
    """`text` as bytes for a constant-time comparison that never fails: header bytes that are no
    UTF-8 reach us as lone surrogates (aiohttp and os.environ decode with surrogateescape), kept
    as they are."""
    return text.encode("utf-8", "surrogatepass")


def refusal(restricted: Mapping[str, Key], category: str | None, headers: Mapping[str, str]) -> str:
    """Why a request of `category` with these headers (lower-case keys) is refused ('' if it is not)."""
    key = restricted.get(category or "")
    if key is None:
        return ""
    sent = headers.get(key.header)
    if sent is not None and hmac.compare_digest(_exact_bytes(sent), _exact_bytes(key.value)):
        return ""
    return f"the {category} API is restricted: send header '{key.header}' with its value"


def guard(spec: str, api: Mapping[str, Mapping[str, str]]) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors that restrict `api` as `spec` says (none when it restricts
    nothing). ValueError naming what is wrong with `spec`."""
    restricted = parse(spec, categories_of(api))
    return [RestrictedApis(restricted, api)] if restricted else []


def check(settings_prefix: str, spec: str, api: Mapping[str, Mapping[str, str]], headers_spec: str = "",
          node_headers_spec: str = "") -> None:
    """A service's restricted-API and registry- and node-header settings parse (SystemExit
    naming the variable and the problem otherwise), checked before it starts."""
    try:
        parse(spec, categories_of(api))
    except ValueError as exc:
        raise SystemExit(f"{settings_prefix}RESTRICTED_APIS: {exc}") from None
    for name, value in (("REGISTRY_HEADERS", headers_spec), ("NODE_HEADERS", node_headers_spec)):
        try:
            headers(value)
        except ValueError as exc:
            raise SystemExit(f"{settings_prefix}{name}: {exc}") from None


class RestrictedApis(grpc.aio.ServerInterceptor):
    """Refuses calls of restricted categories that lack their header; `api` says which methods
    of which services fall in which category (the OIP API unless told)."""

    def __init__(self, restricted: Mapping[str, Key], api: Mapping[str, Mapping[str, str]] = OIP_API):
        self.restricted = dict(restricted)
        self.api = api

    async def intercept_service(self, continuation, handler_call_details):
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        methods = self.api.get(service)
        if methods is not None:
            headers = {k.lower(): v for k, v in (handler_call_details.invocation_metadata or ())
                       if isinstance(v, str)}
            reason = refusal(self.restricted, methods.get(method), headers)
            if reason:
                handler = await continuation(handler_call_details)
                return _denied(handler, reason)
        return await continuation(handler_call_details)


def _denied(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind as `handler` that answers PERMISSION_DENIED."""
    return refusing(handler, grpc.StatusCode.PERMISSION_DENIED, reason)
