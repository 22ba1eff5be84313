"""`cnei models push|list|delete|load|unload`: the registry's model versions, and Triton's
explicit model control through the coordinator."""
from __future__ import annotations

import argparse

from services.cli import clients
from services.cli.output import progress, table


async def models_push(args) -> int:
    meta = clients.key_values(args.meta, "--meta")
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



def add_parser(sub) -> tuple[argparse._SubParsersAction, list[argparse.ArgumentParser], list[argparse.ArgumentParser]]:
    """The `models` verbs' parsers: (the verbs, the registry's clients, the coordinator's)."""
    models = sub.add_parser("models", aliases=["model"], help="registry operations").add_subparsers(
        dest="verb", required=True)
    push = models.add_parser("push", help="upload an ONNX model version")
    push.add_argument("file")
    push.add_argument("--name", required=True)
    push.add_argument("--version", required=True)
    push.add_argument("--precision", default="FP32")
    push.add_argument("--meta", action="append", default=[], help="metadata key=value (repeatable)")
    lst = models.add_parser("list", help="list registered variants")
    lst.add_argument("--name", default="")
    delete = models.add_parser("delete", help="delete a version (refused while it is in use) and the "
                                              "artifacts no other variant refers to")
    delete.add_argument("name")
    delete.add_argument("version")
    delete.add_argument("--precision", default="", help="delete this variant only (default: every one)")
    controls = []
    for verb, what in (("load", "put a model back in service, loaded on its nodes"),
                       ("unload", "take a model out of service and out of the nodes' memory")):
        ctl = models.add_parser(verb, help=what)
        controls.append(ctl)
        ctl.add_argument("model")
        ctl.add_argument("--url", default="127.0.0.1:8001", help="coordinator gRPC address")
        ctl.add_argument("--timeout", type=float, default=120.0)
    return models, [push, lst, delete], controls


VERBS = {"push": models_push, "list": models_list, "delete": models_delete, "load": models_control,
         "unload": models_control}
