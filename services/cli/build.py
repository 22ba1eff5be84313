"""`cnei models build`: FP16/INT8 variants of a registered FP32 model, measured and registered,
with a progress bar over the steps (fetch, convert, measure, upload)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

from services.cli import clients
from services.cli import output
from services.cli.output import progress
from services.common.errors import ErrorCode, FailedPrecondition, InvalidArgument
from services.registry import variants

INHERITED = ("task", "labels", "max_batch_size")  # what a variant shares with its FP32 parent


def _digits_test_split():
    from services.models.digits import load_split

    _, x_test, _, y_test = load_split()
    return x_test, y_test


EVAL_SETS = {"digits": _digits_test_split}


async def _in_thread(fn, *args):
    """fn(*args) in a thread. A Ctrl-C meanwhile (the task cancelled) waits for it to end before
    the build unwinds, so nothing writes into the build's temporary directory while it is removed
    (a second Ctrl-C stops at once)."""
    running = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await running
        raise


def eval_data(name: str):
    if not name:
        return None
    if name not in EVAL_SETS:
        raise InvalidArgument(f"unknown evaluation set {name!r} (known: {sorted(EVAL_SETS)})")
    return EVAL_SETS[name]()


def already_built(existing: list, parent) -> dict[str, object]:
    """The parent version's variants by precision (its FP32 left out); FailedPrecondition for one
    not built from this FP32 (a re-run skips the ones that were, and cannot replace the others)."""
    found = {v.precision: v for v in existing if v.version == parent.version and v.precision != "FP32"}
    for precision, v in found.items():
        if v.metadata.get("built_from_sha256") != parent.sha256:
            raise FailedPrecondition(f"{parent.name} v{parent.version} {precision} is already registered and was not "
                                     f"built from this FP32 (sha256:{parent.sha256[:12]}): leave it out of "
                                     "--precisions, or build from another version")
    return found


def quality_notes(meta: dict[str, str]) -> list[str]:
    """What a built variant's measurements say, each named: its accuracy on the evaluation set
    (with --eval), its top-1 agreement with FP32 on generated inputs, else its largest difference."""
    notes = []
    if "accuracy" in meta:
        notes.append(f"accuracy {meta['accuracy']}" + (f" on {meta['accuracy_dataset']}"
                                                       if meta.get("accuracy_dataset") else ""))
    if "top1_agreement_vs_fp32" in meta:
        notes.append(f"top-1 agreement with FP32 {meta['top1_agreement_vs_fp32']}")
    elif "max_abs_diff_vs_fp32" in meta:
        notes.append(f"max |diff| vs FP32 {meta['max_abs_diff_vs_fp32']}")
    return notes


async def _build_one(client, parent, fp32: Path, precision: str, args, labelled, show, done: int, total: int):
    show(done, total, f" converting {precision}")
    path = await _in_thread(variants.build_one, fp32, precision, fp32.parent)
    show(done + 1, total, f" measuring {precision}")
    meta = await _in_thread(variants.describe, fp32, path, labelled, parent.sha256, precision,
                                   args.min_agreement, parent.metadata.get("eval_output", ""))
    meta.update({k: parent.metadata[k] for k in INHERITED if k in parent.metadata})
    if labelled is not None:
        meta["accuracy_dataset"] = f"{args.eval} held-out split"
    show(done + 2, total, f" uploading {precision}")
    return await client.push_file(path, parent.name, parent.version, precision, meta)


async def models_build(args) -> int:
    precisions = [p.upper() for p in args.precisions]
    bad = [p for p in precisions if p not in variants.BUILDABLE]
    if bad:
        raise InvalidArgument(f"can build {list(variants.BUILDABLE)} variants, not {bad}")
    if not 0.0 <= args.min_agreement <= 1.0:
        raise InvalidArgument(f"--min-agreement is a fraction from 0 to 1, not {args.min_agreement:g}")
    client = clients.registry(args)
    refused = []
    try:
        parent = await client.resolve(args.name, args.version, "FP32")
        skipped = already_built(await client.list(parent.name), parent)
        todo = [p for p in precisions if p not in skipped]
        for precision in (p for p in precisions if p in skipped):
            print(f"{parent.name} v{parent.version} {precision} already built from this FP32: skipped")
        show, total = progress(f"build {parent.name} v{parent.version}", unit="steps"), 1 + 3 * len(todo)
        show(0, total, " fetching FP32")
        with tempfile.TemporaryDirectory(prefix="cnei-build-") as tmp:
            fp32 = Path(tmp) / f"{parent.name}-fp32.onnx"
            fp32.write_bytes(await client.fetch_artifact(parent.sha256))
            labelled = await _in_thread(eval_data, args.eval) if todo else None
            done, built = 1, []
            for precision in todo:
                try:
                    built.append(await _build_one(client, parent, fp32, precision, args, labelled, show, done, total))
                    note = f" {precision} registered"
                except InvalidArgument as exc:
                    refused.append(exc.message)
                    note = f" {precision} refused"
                done += 3
                show(done, total, note)
    finally:
        await client.close()
    for v in built:
        print(f"registered {v.name} v{v.version} {v.precision} sha256:{v.sha256[:12]} "
              f"({', '.join([f'{v.size_bytes} bytes', *quality_notes(v.metadata)])})")
    output.end_bar()
    for message in refused:
        print(f"error ({ErrorCode.INVALID_ARGUMENT.value}): {message}", file=sys.stderr)
    return 2 if refused else 0


def add_parser(models) -> argparse.ArgumentParser:
    build = models.add_parser("build", help="build FP16/INT8 variants of a registered FP32 model")
    build.add_argument("name")
    build.add_argument("--version", default="", help="version to build from (default: latest)")
    build.add_argument("--precisions", nargs="+", default=list(variants.BUILDABLE))
    build.add_argument("--eval", default="", help=f"labelled data to measure accuracy on ({', '.join(EVAL_SETS)})")
    build.add_argument("--min-agreement", type=float, default=variants.MIN_AGREEMENT,
                       help="refuse a variant whose top-1 agreement with FP32 on generated inputs is below this "
                            f"(default {variants.MIN_AGREEMENT:g}; 0 turns the gate off)")
    build.add_argument("--registry", default="127.0.0.1:50051")
    return build
