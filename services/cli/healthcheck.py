"""`python -m services.cli.healthcheck HOST:PORT`: exit 0 when the gRPC health service says SERVING.

Made for container healthchecks: one standard grpc.health.v1 Health/Check call with a short
deadline, nothing else imported from the services but the TLS files' loader and its own
settings (no service settings, no telemetry).
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import settings as cfg
from services.common import tls
from services.common.client_settings import HEALTHCHECK_PREFIX, HealthcheckSettings

SERVING = health_pb2.HealthCheckResponse.SERVING


def _channel(target: str, tls_ca: str, tls_cert: str, tls_key: str, server_name: str = "") -> grpc.Channel:
    if not tls_ca:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, tls.channel_credentials(tls_ca, tls_cert, tls_key),
                               options=tls.server_name_options(server_name))


def check(target: str, service: str = "", timeout: float = 2.0, tls_ca: str = "", tls_cert: str = "",
          tls_key: str = "", server_name: str = "") -> tuple[bool, str]:
    """(serving, status name or error) for `service` ("" = the whole server) at `target`; over TLS
    trusting `tls_ca` when given (with a client certificate for mutual TLS), checking
    `server_name` in the server's certificate instead of the host dialled (a public name while
    the check dials 127.0.0.1)."""
    try:
        with _channel(target, tls_ca, tls_cert, tls_key, server_name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    except (OSError, ValueError) as exc:  # a TLS file missing, unreadable or not PEM
        return False, f"cannot use the TLS files: {exc}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == SERVING, status


# The healthcheck's own variables (a container's env may set them beside its service's settings)
ENV = tuple(variable for variable, _, _ in cfg.describe(HealthcheckSettings, HEALTHCHECK_PREFIX))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cli.healthcheck",
                                     description="gRPC health check: exit 0 when SERVING, 1 otherwise")
    parser.add_argument("target", help="HOST:PORT of a gRPC server with the standard health service")
    parser.add_argument("--service", default="", help="service name to check (default: the server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds (default 2)")
    env = cfg.load_at_start(HealthcheckSettings, HEALTHCHECK_PREFIX)
    parser.add_argument("--tls-ca", default=env.tls_ca,
                        help="a server on TLS: the CA (PEM) to trust (default: $CNEI_HEALTHCHECK_TLS_CA)")
    parser.add_argument("--tls-cert", default=env.tls_cert,
                        help="client certificate (PEM) for mutual TLS (default: $CNEI_HEALTHCHECK_TLS_CERT)")
    parser.add_argument("--tls-key", default=env.tls_key, help="its key (default: $CNEI_HEALTHCHECK_TLS_KEY)")
    parser.add_argument("--tls-server-name", default=env.tls_server_name,
                        help="the name the server's certificate holds, checked instead of the host dialled "
                             "(default: $CNEI_HEALTHCHECK_TLS_SERVER_NAME)")
    args = parser.parse_args(argv)
    serving, status = check(args.target, args.service, args.timeout, args.tls_ca, args.tls_cert, args.tls_key,
                            args.tls_server_name)
    print(f"{args.target} {args.service or '(server)'}: {status}",
          file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
