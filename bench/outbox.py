"""Micro-benchmark of the on-disk event outbox: time and bytes written (/proc/self/io wchar) to
append events to a byte-bounded outbox, and to flush a full one as the event bus does.

python bench/outbox.py [--events 20000] [--max-bytes 1048576] [--outbox-file services/common/outbox.py]
(--outbox-file: another version of the module, e.g. `git show REV:services/common/outbox.py > f`)."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common import events  # noqa: E402


def written() -> int:
    """Bytes this process has passed to write() so far."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["wchar"])


def load_outbox(path: Path):
    spec = importlib.util.spec_from_file_location("outbox_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Outbox


def measure(label: str, step) -> None:
    start_bytes, start = written(), time.perf_counter()
    step()
    seconds, mib = time.perf_counter() - start, (written() - start_bytes) / (1 << 20)
    print(f"{label}: {seconds:.2f} s, {mib:.1f} MiB written")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--max-bytes", type=int, default=1 << 20)
    parser.add_argument("--outbox-file", type=Path, default=REPO / "services/common/outbox.py")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # a full outbox logs each drop
    outbox_class = load_outbox(args.outbox_file)
    envelopes = [events.Envelope(type=events.NODE_METRICS, source="runtime/edge-a1",
                                 payload={"seq": i, "pad": "x" * 200}) for i in range(args.events)]
    with tempfile.TemporaryDirectory() as folder:
        outbox = outbox_class(Path(folder) / "outbox.jsonl", max_bytes=args.max_bytes)
        measure(f"append {args.events} events, {args.max_bytes} bytes at most",
                lambda: [outbox.put(events.NODE_METRICS, envelope) for envelope in envelopes])
        kept = len(outbox)

        def flush() -> None:
            while batch := outbox.peek(100):
                outbox.pop(through=batch[-1].seq)

        measure(f"flush the full outbox ({kept} events, 100 a batch)", flush)


if __name__ == "__main__":
    main()
