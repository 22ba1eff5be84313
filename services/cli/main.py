"""The `cnei` command line: up, models push/list/build, deploy, infer, status, train."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
import numpy as np

from services.cli import build, clients, output, train
from services.cli.output import progress, table
from services.common.errors import CneiError, FailedPrecondition, InvalidArgument, NotFound


def key_values(pairs: list[str], flag: str) -> dict[str, str]:
    """`--flag KEY=VALUE` flags -> a dict; one without `=` or with an empty key is refused by name."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise InvalidArgument(f"{flag} needs KEY=VALUE, not '{pair}'")
        out[key.strip()] = value
    return out


async def models_push(args) -> int:
    meta = key_values(args.meta, "--meta")
    client = clients.registry(args)
    try:
        v = await client.push_file(args.file, args.name, args.version, args.precision.upper(), meta,
                                   progress=progress(f"push {args.name}"))
    finally:
        await client.close()
    print(f"registered {v.name} v{v.version} {v.precision} sha256:{v.sha256} ({v.size_bytes} bytes)")
    return 0


async def models_list(args) -> int:
    client = clients.registry(args)
    try:
        variants = await client.list(args.name or "")
    finally:
        await client.close()
    rows = [[v.name, v.version, v.precision, v.size_bytes, v.metadata.get("accuracy", "-"),
             v.sha256[:12]] for v in variants]
    print(table(rows, ["MODEL", "VERSION", "PRECISION", "BYTES", "ACCURACY", "SHA256"]))
    return 0


async def models_delete(args) -> int:
    """`cnei model delete NAME VERSION [--precision P]`: delete a version (or one variant of it)
    from the registry, and the artifacts no variant refers to any more."""
    client = clients.registry(args)
    try:
        deleted, freed = await client.delete(args.name, args.version, args.precision)
    finally:
        await client.close()
    print(f"deleted {', '.join(v.key for v in deleted)} ({freed} bytes of artifacts freed)")
    return 0


async def models_control(args) -> int:
    """`cnei models load|unload NAME`: Triton's explicit model control through the coordinator."""
    from services.common import grpc_util
    from services.pb.inference import grpc_service_pb2 as pb
    from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

    channel = grpc_util.channel(args.url, credentials=clients.credentials(args))
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = clients.headers(args)
        if args.verb == "load":
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=args.model), timeout=args.timeout,
                                           metadata=metadata)
            print(f"model {args.model} loaded: in service and warm on its nodes")
        else:
            await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=args.model),
                                             timeout=args.timeout, metadata=metadata)
            print(f"model {args.model} unloaded: out of service until `cnei models load {args.model}`")
    finally:
        await channel.close()
    return 0


def _input_array(args, spec) -> np.ndarray:
    if args.digits:
        from services.models.digits import load_all

        return load_all()[0][: args.digits]
    if args.data:
        from services.common import codec

        return np.asarray(json.loads(args.data), dtype=codec.datatype(spec.datatype).dtype)
    shape = [args.batch if d < 0 else d for d in spec.shape]
    return np.random.default_rng(0).random(shape).astype(np.float32)


def _parameter_value(text: str) -> bool | int | float | str:
    """A `--param` value as the OIP parameter type it reads as: true/false, an integer, a
    number, else a string (`precision=INT8`, `accuracy_floor=0.95`, `priority=1`)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def request_parameters(pairs: list[str]) -> dict:
    """`--param KEY=VALUE` flags -> the request's OIP parameters; a flag without `=` or with an
    empty key is refused by name."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"cnei infer: --param needs KEY=VALUE, not '{pair}'")
        out[key.strip()] = _parameter_value(value)
    return out


async def infer(args) -> int:
    from services.common import grpc_util, oip
    from services.pb.inference import grpc_service_pb2 as pb
    from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

    async with grpc_util.channel(args.url, credentials=clients.credentials(args)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = clients.headers(args)
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model), timeout=10, metadata=metadata)
        spec = meta.inputs[0]
        array = _input_array(args, spec)
        params = request_parameters(args.param)
        if args.precision:
            params["precision"] = args.precision
        request = oip.InferRequest(model_name=args.model, inputs={spec.name: array}, parameters=params)
        start = time.perf_counter()
        reply = await stub.ModelInfer(oip.request_to_proto(request), timeout=30, metadata=metadata)
        elapsed = (time.perf_counter() - start) * 1000
    response = oip.response_from_proto(reply)
    for name, out in response.outputs.items():
        print(f"{name} {out.dtype} {list(out.shape)}")
        if out.ndim == 2 and out.dtype.kind == "f":
            print("  top-1:", out.argmax(axis=1).tolist())
        else:
            print(" ", out.tolist())
    print(f"served by {response.parameters} v{response.model_version} in {elapsed:.2f} ms")
    return 0


def fetch_status(url: str, timeout: float = 3.0) -> dict | None:
    """The coordinator's /api/status, or None when it does not answer."""
    import urllib.error
    import urllib.request

    url = url.rstrip("/")
    url = url if "://" in url else f"http://{url}"  # host:port
    url = url if url.endswith("/api/status") else url + "/api/status"
    from services.common import tls

    ca, cert, key = tls.client_files()
    context = tls.client_ssl_context(ca, cert, key) if url.startswith("https:") and ca else None  # a coordinator on TLS
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}ms"


def _batching(b: dict) -> str:
    return f"{b['max_batch_size']}/{b['max_queue_delay_us']}us"


def status_text(s: dict) -> str:
    """The status page as terminal tables."""
    nodes = [[n["id"], n["tier"], n["region"], n["address"], n["health"], n["inflight"],
              f"{n['cpu_load']:.0%}", f"{n['mem_load']:.0%}", _ms(n["rtt_ms"]),
              "-" if n["heartbeat_age_s"] is None else f"{n['heartbeat_age_s']}s", ",".join(n["models"]) or "-"]
             for n in s["nodes"]]
    out = ["NODES", table(nodes, ["NODE", "TIER", "REGION", "ADDRESS", "HEALTH", "INFLIGHT", "CPU", "MEM",
                                  "RTT", "HEARTBEAT", "LOADED"]), "", "MODELS"]
    if s.get("models_error"):
        out.append(f"error: {s['models_error']}")
    variants = [[m["name"], v["version"], v["precision"], "-" if v["accuracy"] is None else v["accuracy"],
                 " ".join(f"{c}={ms}ms" for c, ms in v["latency_ms"].items()) or "-",
                 "serving" if m.get("in_service", True) else "unloaded"]
                for m in s["models"] for v in m["variants"]]
    out.append(table(variants, ["MODEL", "VERSION", "PRECISION", "ACCURACY", "LATENCY", "STATE"]))
    deployments = [[m["name"], d.get("rollout", "latest"), d["scheduler"], _batching(d["batching"]),
                    d["joint"], d["precision"], "+".join(d["tiers"]), "applied" if d["applied"] else "defaults"]
                   for m in s["models"] for d in [m["deployment"]] if not d.get("ensemble")]
    out += ["", "DEPLOYMENTS", table(deployments, ["MODEL", "SERVING", "SCHEDULER", "BATCH/DELAY", "JOINT",
                                                   "PRECISION", "TIERS", "SPEC"])]
    ensembles = [[m["name"], m["deployment"]["ensemble"]] for m in s["models"] if m["deployment"].get("ensemble")]
    if ensembles:
        out += ["", "ENSEMBLES", table(ensembles, ["MODEL", "STEPS"])]
    latency = [[r["model"], r["node"], r["samples"], _ms(r["p50_ms"]), _ms(r["p99_ms"])] for r in s["latency"]]
    out += ["", "LATENCY", table(latency, ["MODEL", "NODE", "SAMPLES", "P50", "P99"])]
    events = [[f"{e['age_s']}s ago", e["kind"], " ".join(f"{k}={v}" for k, v in e.items()
                                                       if k not in ("kind", "time", "age_s"))]
              for e in s["events"][:15]]
    out += ["", "RECENT FAILOVERS, ESCALATIONS AND NODE UP/DOWN", table(events, ["WHEN", "KIND", "DETAIL"]), "", "FEDERATED JOBS"]
    jobs = s["federated"]["jobs"]
    out.append(train.jobs_table(jobs) if jobs else f"none running ({s['federated']['note']})")
    return "\n".join(out)


async def status(args) -> int:
    snapshot = await asyncio.to_thread(fetch_status, args.url)
    if snapshot is not None:
        print(status_text(snapshot))
        return 0
    print(f"coordinator not reachable at {args.url}; reading Redis and the registry directly", file=sys.stderr)
    return await status_direct(args)


async def status_direct(args) -> int:
    from redis.asyncio import Redis

    from services.common.nodes import NodeDirectory

    redis = Redis.from_url(args.redis, socket_timeout=2)
    try:
        nodes = await NodeDirectory(redis).live_nodes()
    finally:
        await redis.aclose()
    rows = [[n.node_id, n.tier, n.region, n.address, n.inflight, f"{time.time() - n.updated_at:.1f}s",
             ",".join(n.models) or "-"] for n in nodes]
    print("NODES")
    print(table(rows, ["NODE", "TIER", "REGION", "ADDRESS", "INFLIGHT", "HEARTBEAT", "LOADED"]))
    print()
    print("MODELS")
    return await models_list(argparse.Namespace(registry=args.registry, name="", header=args.header))


async def deploy_apply(args) -> int:
    """Apply a ModelDeployment spec from a YAML or JSON file."""
    import yaml

    from services.common import deployment
    with open(args.file) as fh:
        spec = deployment.check_put(deployment.from_dict(yaml.safe_load(fh)))
    client = clients.registry(args)
    try:
        applied = await client.put_deployment(spec)
    finally:
        await client.close()
    print(f"deployment for model '{applied.model}' applied")
    print(deployment.to_json(applied))
    return 0


def rollout_change(spec, verb: str, version: str = "", percent: float = 0.0, variants: list = ()):
    """The rollout of deployment `spec` after `cnei deploy canary|promote|rollback`: a canary of
    `version` taking `percent` % of the requests that name no version; the canary made the stable
    version; the canary dropped. A canary over no pinned stable version pins the latest of the
    model's other versions (`variants`: the model's; `served.latest_version`), the one the
    rest of the requests go to, and that rollback comes back to (an unpinned stable one would
    follow the latest version: the canary itself, when it is the latest). FailedPrecondition when
    there is no canary to promote or roll back, or no other version to keep as the stable one."""
    from dataclasses import replace

    from services.common.served import latest_version

    rollout = spec.rollout
    if verb == "canary":
        stable = rollout.stable
        if not stable:
            try:
                stable = latest_version(spec, [v for v in variants if v.version != version])
            except (NotFound, FailedPrecondition):
                raise FailedPrecondition(f"version {version} is the model's only version with every precision its "
                                         "deployment needs: there is no other to keep as the stable one beside a "
                                         "canary") from None
        return replace(rollout, stable=stable, canary=version, canary_percent=percent)
    if not rollout.canary:
        raise FailedPrecondition(f"there is no canary to {verb} (stable version: {rollout.stable or 'the latest'})")
    if verb == "promote":
        return replace(rollout, stable=rollout.canary, canary="", canary_percent=0.0)
    return replace(rollout, canary="", canary_percent=0.0)


ROLLOUT_ATTEMPTS = 5  # reads and puts of `cnei deploy canary|promote|rollback` racing other puts


async def deploy_rollout(args) -> int:
    """`cnei deploy canary|promote|rollback MODEL`: change the rollout of the model's deployment
    (the defaults when none was applied) and apply it, only over the deployment it read: when
    another was put meanwhile (`cnei deploy apply`), read that one and change it instead."""
    client = clients.registry(args)
    try:
        for _ in range(ROLLOUT_ATTEMPTS):
            if (applied := await _rollout_once(client, args)) is not None:
                break
        else:
            raise FailedPrecondition(f"the deployment of model '{args.model}' kept changing while it was "
                                     f"read and put ({ROLLOUT_ATTEMPTS} times)")
    finally:
        await client.close()
    canary = f", canary v{applied.canary} at {applied.canary_percent:g} %" if applied.canary else ", no canary"
    print(f"model '{args.model}': stable {'v' + applied.stable if applied.stable else 'the latest version'}{canary}")
    return 0


async def _read_deployment(client, model: str):
    """(the model's deployment, else the defaults; its updated_at, else NO_DEPLOYMENT)."""
    from services.common.deployment import DeploymentSpec
    from services.common.registry_client import NO_DEPLOYMENT
    try:
        return await client.read_deployment(model)
    except NotFound:
        return DeploymentSpec(model=model), NO_DEPLOYMENT


async def _rollout_once(client, args):
    """Read the deployment, change its rollout and put it over the one read: the rollout applied,
    or None when another deployment was put meanwhile."""
    from dataclasses import replace

    spec, read_at = await _read_deployment(client, args.model)
    variants = await client.list(args.model) if args.verb == "canary" else []
    versions = {v.version for v in variants}
    if args.verb == "canary" and not versions:
        raise NotFound(f"model '{args.model}' not found in the registry")
    if args.verb == "canary" and args.version not in versions:
        raise NotFound(f"model '{args.model}' has no version {args.version} "
                       f"(versions: {', '.join(sorted(versions))})")
    rollout = rollout_change(spec, args.verb, getattr(args, "version", ""), getattr(args, "percent", 0.0), variants)
    try:
        return (await client.put_deployment(replace(spec, rollout=rollout), if_updated_at=read_at)).rollout
    except FailedPrecondition:
        if (await _read_deployment(client, args.model))[1] == read_at:
            raise  # refused for what it asks, not for a put that came between
        return None


async def deploy_delete(args) -> int:
    """`cnei deploy delete MODEL`: delete the model's deployment (a KServe InferenceService
    deleted): the model is served with the default settings afterwards, an ensemble is gone."""
    client = clients.registry(args)
    try:
        deleted = await client.delete_deployment(args.model)
    finally:
        await client.close()
    print(f"deployment of model '{args.model}' deleted: it is served with the default settings now "
          "(an ensemble is gone)")
    print(deleted)
    return 0


async def deploy_show(args) -> int:
    from services.common import deployment
    client = clients.registry(args)
    try:
        specs = [await client.get_deployment(args.model)] if args.model else await client.list_deployments()
    finally:
        await client.close()
    for spec in specs:
        print(deployment.to_json(spec))
    return 0


def config(args) -> int:
    """Every setting of every service: variable, default, meaning."""
    from services.cli import up
    from services.common import settings as cfg
    from services.common.telemetry import TelemetrySettings
    from services.coordinator import settings as coordinator
    from services.edge_runtime import settings as runtime
    from services.registry import settings as registry
    from services.trainer import settings as trainer

    sections = [("cnei up", up.MeshSettings, up.PREFIX),
                ("registry", registry.RegistrySettings, registry.PREFIX),
                ("coordinator", coordinator.CoordinatorSettings, coordinator.PREFIX),
                ("runtime", runtime.RuntimeSettings, runtime.PREFIX),
                ("trainer", trainer.TrainerSettings, trainer.PREFIX),
                ("telemetry (every service)", TelemetrySettings, "")]
    for title, cls, prefix in sections:
        print(title.upper())
        print(table([list(row) for row in cfg.describe(cls, prefix)], ["VARIABLE", "DEFAULT", "MEANING"]))
        print()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnei", description="Cloud-Native Edge Intelligence mesh")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the whole mesh locally (what `make run` calls)")
    sub.add_parser("config", help="list every setting (environment variable) with its default")
    models = sub.add_parser("models", aliases=["model"], help="registry operations").add_subparsers(
        dest="verb", required=True)
    push = models.add_parser("push", help="upload an ONNX model version")
    push.add_argument("file")
    push.add_argument("--name", required=True)
    push.add_argument("--version", required=True)
    push.add_argument("--precision", default="FP32")
    push.add_argument("--meta", action="append", default=[], help="metadata key=value (repeatable)")
    deploy = sub.add_parser("deploy", help="ModelDeployment specs").add_subparsers(dest="verb", required=True)
    apply = deploy.add_parser("apply", help="apply a deployment spec (YAML or JSON file)")
    apply.add_argument("file")
    show = deploy.add_parser("get", help="show one model's deployment, or all")
    show.add_argument("model", nargs="?", default="")
    canary = deploy.add_parser("canary", help="send a share of the requests that name no version to a canary version")
    canary.add_argument("model")
    canary.add_argument("version")
    canary.add_argument("--percent", type=float, default=10.0, help="share of those requests (default 10)")
    promote = deploy.add_parser("promote", help="make the canary the stable version")
    rollback = deploy.add_parser("rollback", help="drop the canary: every request goes to the stable version")
    for sp in (promote, rollback):
        sp.add_argument("model")
    undeploy = deploy.add_parser(
        "delete", help="delete a model's deployment: the model is served with the default settings afterwards "
                       "(its latest version), an ensemble is gone; refused while another ensemble runs it as a step")
    undeploy.add_argument("model")
    lst = models.add_parser("list", help="list registered variants")
    lst.add_argument("--name", default="")
    delete = models.add_parser("delete", help="delete a version (refused while it is in use) and the "
                                              "artifacts no other variant refers to")
    delete.add_argument("name")
    delete.add_argument("version")
    delete.add_argument("--precision", default="", help="delete this variant only (default: every one)")
    registry_cmds = (push, lst, delete, apply, show, canary, promote, rollback, undeploy)  # the registry's clients
    for sp in registry_cmds:
        sp.add_argument("--registry", default="127.0.0.1:50051")
    controls = []
    for verb, what in (("load", "put a model back in service, loaded on its nodes"),
                       ("unload", "take a model out of service and out of the nodes' memory")):
        ctl = models.add_parser(verb, help=what)
        controls.append(ctl)
        ctl.add_argument("model")
        ctl.add_argument("--url", default="127.0.0.1:8001", help="coordinator gRPC address")
        ctl.add_argument("--timeout", type=float, default=120.0)
    inf = sub.add_parser("infer", help="run one inference through the coordinator (or a node)")
    inf.add_argument("model")
    inf.add_argument("--url", default="127.0.0.1:8001")
    inf.add_argument("--data", help="input as a JSON (nested) list")
    inf.add_argument("--digits", type=int, default=0, help="use the first N load_digits samples")
    inf.add_argument("--batch", type=int, default=1, help="batch size of random input")
    inf.add_argument("--precision", default="")
    inf.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="an OIP request parameter (repeatable), e.g. accuracy_floor=0.95, "
                          "latency_budget_ms=2, region=site-b, priority=1, timeout_us=50000")
    st = sub.add_parser("status", help="nodes, models, latency and events of the mesh")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="coordinator REST base URL")
    st.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    st.add_argument("--registry", default="127.0.0.1:50051")
    build_parser = build.add_parser(models)
    train_parsers = train.add_parser(sub)
    for env, parsers in (("CNEI_TLS", (inf, *controls)),
                         ("CNEI_REGISTRY_TLS", (*registry_cmds, build_parser)),
                         ("CNEI_TRAINER_TLS", train_parsers)):
        for sp in parsers:
            sp.add_argument("--tls-ca", default="", help=f"CA of a server on TLS (default: ${env}_CA)")
            sp.add_argument("--tls-cert", default="", help=f"client certificate for mutual TLS (default: ${env}_CERT)")
            sp.add_argument("--tls-key", default="", help=f"its key (default: ${env}_KEY)")
    for sp in (inf, *controls, *registry_cmds, build_parser, st, *train_parsers):
        sp.add_argument("--header", action="append", default=[], metavar="KEY=VALUE",
                        help="send this header (restricted APIs; repeatable; default: $CNEI_HEADERS, k=v;k2=v2)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT, no traceback
        output.end_bar()
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.command == "config":
        return config(args)
    if args.command == "up":
        from services.cli.up import run_up

        return run_up()
    verbs = {"push": models_push, "list": models_list, "delete": models_delete, "build": build.models_build,
             "load": models_control, "unload": models_control}
    if args.command == "deploy":
        verbs = {"apply": deploy_apply, "get": deploy_show, "canary": deploy_rollout, "promote": deploy_rollout,
                 "rollback": deploy_rollout, "delete": deploy_delete}
    if args.command == "train":
        verbs = train.VERBS
    handler = verbs.get(getattr(args, "verb", "")) or {"infer": infer, "status": status}[args.command]
    try:
        return asyncio.run(handler(args))
    except CneiError as exc:
        output.end_bar()
        print(f"error ({exc.code.value}): {exc.message}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        output.end_bar()
        print(f"error ({exc.code().name}): {exc.details()}", file=sys.stderr)
        return 2
    except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - one readable line for CLI users
        output.end_bar()
        print(f"error: {type(exc).__name__}: {exc}" if not str(exc) else f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
