"""Terminal output helpers of the `cnei` command line: tables and progress bars."""
from __future__ import annotations

import sys

_bar_open = False  # a progress bar is drawn on stderr's current line


def progress(label: str, unit: str = "bytes"):
    def show(done: int, total: int, note: str = "") -> None:
        global _bar_open
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}{note}")
        _bar_open = done < total
        if not _bar_open:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def end_bar() -> None:
    """End a progress bar left mid-line (an error or Ctrl-C), so what follows starts a line."""
    global _bar_open
    if _bar_open:
        sys.stderr.write("\n")
        _bar_open = False


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*map(str, r)) for r in rows])
