"""Terminal output helpers of the `cnei` command line: tables and progress bars."""
from __future__ import annotations

import sys


def progress(label: str, unit: str = "bytes"):
    def show(done: int, total: int, note: str = "") -> None:
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}{note}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*map(str, r)) for r in rows])
