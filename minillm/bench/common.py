"""Shared benchmark helpers: timing with medians, machine description, BENCHMARKS.md sections."""

import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

from minillm import system

BENCHMARKS_FILE = Path("BENCHMARKS.md")


def seconds_of(fn, sync=None):
    """Wall time of one fn() call. `sync` (e.g. a device synchronise) is called before each
    clock read, so asynchronous GPU work is inside the measured interval."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def median_seconds(fn, repeat=5, warmup=1, sync=None):
    """Median wall time of fn() over `repeat` runs, after `warmup` untimed runs; `sync` as in seconds_of."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds_of(fn, sync) for _ in range(repeat))


def interleaved_times(functions, steps, sync=None):
    """Seconds of each call of each function, timed in turns (one call each per round), after one untimed round.

    Taking turns exposes every function to the same drift of a shared machine, so
    per-round ratios compare them fairly. `sync` as in seconds_of.
    """
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(steps):
        for name, fn in functions.items():
            times[name].append(seconds_of(fn, sync))
    return times


def machine_description():
    import numpy

    return f"{system.cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {numpy.__version__}"


def format_table(headers, rows):
    """A Markdown table; every cell is str()-ed."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_section(title, body, path=BENCHMARKS_FILE):
    """Put `body` under the heading `## title` in BENCHMARKS.md, replacing an older run of it."""
    stamp = datetime.date.today().isoformat()
    section = (
        f"## {title}\n\n"
        f"Measured {stamp} on {machine_description()}.\n"
        f"Command: `{command_line()}`\n\n"
        f"{body.strip()}\n"
    )
    text = (path.read_text(encoding="utf-8") if path.exists()
            else "# Benchmarks\n\nMeasured tables; each section names the command that reproduces it.\n")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def command_line():
    """How this benchmark was started, e.g. `python -m minillm.bench.sampling --write`."""
    spec = sys.modules["__main__"].__spec__
    program = f"python -m {spec.name}" if spec else f"python {Path(sys.argv[0]).name}"
    return " ".join([program, *sys.argv[1:]])
