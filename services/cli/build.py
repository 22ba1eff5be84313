"""`cnei models build`: FP16/INT8 variants of a registered FP32 model, measured and registered,
with a progress bar over the steps (fetch, convert, measure, upload)."""
from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from services.cli import clients
from services.cli.output import progress
from services.common.errors import InvalidArgument
from services.registry import variants

INHERITED = ("task", "labels", "max_batch_size")  # what a variant shares with its FP32 parent


def _digits_test_split():
    from services.models.digits import load_split

    _, x_test, _, y_test = load_split()
    return x_test, y_test


EVAL_SETS = {"digits": _digits_test_split}


def eval_data(name: str):
    if not name:
        return None
    if name not in EVAL_SETS:
        raise InvalidArgument(f"unknown evaluation set {name!r} (known: {sorted(EVAL_SETS)})")
    return EVAL_SETS[name]()


async def models_build(args) -> int:
    precisions = [p.upper() for p in args.precisions]
    bad = [p for p in precisions if p not in variants.BUILDABLE]
    if bad:
        raise InvalidArgument(f"can build {list(variants.BUILDABLE)} variants, not {bad}")
    client = clients.registry(args)
    try:
        parent = await client.resolve(args.name, args.version, "FP32")
        show, total = progress(f"build {parent.name} v{parent.version}", unit="steps"), 1 + 3 * len(precisions)
        show(0, total, " fetching FP32")
        with tempfile.TemporaryDirectory(prefix="cnei-build-") as tmp:
            fp32 = Path(tmp) / f"{parent.name}-fp32.onnx"
            fp32.write_bytes(await client.fetch_artifact(parent.sha256))
            labelled = await asyncio.to_thread(eval_data, args.eval)
            done, built = 1, []
            for precision in precisions:
                show(done, total, f" converting {precision}")
                path = await asyncio.to_thread(variants.build_one, fp32, precision, Path(tmp))
                show(done + 1, total, f" measuring {precision}")
                meta = await asyncio.to_thread(variants.describe, fp32, path, labelled, parent.sha256)
                meta.update({k: parent.metadata[k] for k in INHERITED if k in parent.metadata})
                if labelled is not None:
                    meta["accuracy_dataset"] = f"{args.eval} held-out split"
                show(done + 2, total, f" uploading {precision}")
                built.append(await client.push_file(path, parent.name, parent.version, precision, meta))
                done += 3
                show(done, total, f" {precision} registered")
    finally:
        await client.close()
    for v in built:
        quality = v.metadata.get("accuracy") or v.metadata.get("top1_agreement_vs_fp32", "-")
        print(f"registered {v.name} v{v.version} {v.precision} sha256:{v.sha256[:12]} "
              f"({v.size_bytes} bytes, accuracy/agreement {quality})")
    return 0


def add_parser(models) -> argparse.ArgumentParser:
    build = models.add_parser("build", help="build FP16/INT8 variants of a registered FP32 model")
    build.add_argument("name")
    build.add_argument("--version", default="", help="version to build from (default: latest)")
    build.add_argument("--precisions", nargs="+", default=list(variants.BUILDABLE))
    build.add_argument("--eval", default="", help=f"labelled data to measure accuracy on ({', '.join(EVAL_SETS)})")
    build.add_argument("--registry", default="127.0.0.1:50051")
    return build
