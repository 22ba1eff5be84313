"""`python -m services.cli.register_demo --registry HOST:PORT`: build and push the digits demo model.

The one-shot `demo-model` service of deploy/compose runs this; it reuses what `cnei up` does
(services.cli.up.register_demo), so versions already registered are kept and reported.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

from services.cli.healthcheck import check
from services.cli.up import register_demo
from services.common import tls


def wait_serving(target: str, timeout: float) -> str:
    """'' once the registry's health service says SERVING, else the last status seen (over TLS
    with $CNEI_REGISTRY_TLS_CA/_CERT/_KEY, as the pushes)."""
    ca, cert, key = tls.client_files(env=tls.REGISTRY_ENV)
    deadline = time.monotonic() + timeout
    while True:
        serving, status = check(target, timeout=min(2.0, max(timeout, 0.1)), tls_ca=ca, tls_cert=cert, tls_key=key)
        if serving or time.monotonic() >= deadline:
            return "" if serving else status
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cli.register_demo",
                                     description="build the digits demo model and register it")
    parser.add_argument("--registry", default="127.0.0.1:50051", help="registry gRPC address")
    parser.add_argument("--models-dir", default="",
                        help="where the ONNX files are built (default: a temporary directory)")
    parser.add_argument("--wait", type=float, default=30.0,
                        help="seconds to wait for the registry to be SERVING (default 30)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    status = wait_serving(args.registry, args.wait)
    if status:
        print(f"registry at {args.registry} is not serving ({status})", file=sys.stderr)
        return 1
    try:
        if args.models_dir:
            lines = asyncio.run(register_demo(args.registry, Path(args.models_dir)))
        else:
            with tempfile.TemporaryDirectory(prefix="cnei-models-") as tmp:
                lines = asyncio.run(register_demo(args.registry, Path(tmp)))
    except Exception as exc:  # noqa: BLE001 - a one-shot reports and fails
        print(f"registering the demo model at {args.registry} failed: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
