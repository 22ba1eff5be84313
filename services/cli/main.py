"""The `cnei` command line: up, config, and the verbs of models, deploy, infer, status and train
(each in its module)."""
from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from services.cli import build, deploy, infer, models, output, status, train
from services.cli.output import table
from services.common.errors import CneiError


def config(args) -> int:
    """Every setting of every service and command-line client: variable, default, meaning."""
    from services.cli import up
    from services.common import client_settings as client
    from services.common import settings as cfg
    from services.common import tls
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
                ("telemetry (every service)", TelemetrySettings, ""),
                ("cnei commands", client.ClientHeaderSettings, client.HEADERS_PREFIX),
                *((f"cnei commands: TLS to {server}", client.ClientTlsSettings, f"{env}_")
                  for env, server in tls.CLIENT_TLS_ENVS),
                ("healthcheck (python -m services.cli.healthcheck)", client.HealthcheckSettings,
                 client.HEALTHCHECK_PREFIX)]
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
    verbs, model_cmds, controls = models.add_parser(sub)
    registry_cmds = (*model_cmds, *deploy.add_parser(sub))  # the registry's clients
    for sp in registry_cmds:
        sp.add_argument("--registry", default="127.0.0.1:50051")
    inf = infer.add_parser(sub)
    st = status.add_parser(sub)
    build_parser = build.add_parser(verbs)
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
    # the servers a command calls unless told: those `cnei up` starts under the same settings
    from services.cli import up
    from services.common import settings as cfg

    mesh = cfg.load_at_start(up.MeshSettings, up.PREFIX)
    for sp in (*registry_cmds, build_parser, st):
        sp.set_defaults(registry=f"127.0.0.1:{mesh.registry_port}")
    for sp in (inf, *controls):
        sp.set_defaults(url=f"127.0.0.1:{mesh.grpc_port}")
    st.set_defaults(url=f"http://127.0.0.1:{mesh.http_port}", redis=mesh.redis_url)
    for sp in train_parsers:
        sp.set_defaults(trainer=f"127.0.0.1:{mesh.trainer_port}")
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
    verbs = {"deploy": deploy.VERBS, "train": train.VERBS}.get(args.command, {**models.VERBS, "build": build.models_build})
    handler = verbs.get(getattr(args, "verb", "")) or {"infer": infer.infer, "status": status.status}[args.command]
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
