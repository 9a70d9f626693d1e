"""What the benchmarks share: progress lines, timing helpers, the machine's description."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Json = dict[str, Any]
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(message: str) -> None:
    """Progress, to stderr."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect now, then keep the collector off while timing."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def us(samples_ns: list[int]) -> tuple[float, float]:
    """Median and min of nanosecond samples, in microseconds."""
    return statistics.median(samples_ns) / 1e3, min(samples_ns) / 1e3


def git(*args: str) -> str:
    """Output of a git command in this repository ("" if it fails)."""
    repo = Path(__file__).resolve().parent.parent
    run = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else ""


def machine() -> Json:
    """What ran the benchmark, and how busy it was."""
    model, hypervisor = "", False
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                hypervisor = hypervisor or "hypervisor" in line.split()
    reporting = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    return {
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "hypervisor": hypervisor,
        "free_page_reporting_order": (int(reporting.read_text()) if reporting.exists() else None),
        "python": platform.python_version(),
        "page_size": PAGE,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "devanon_commit": git("rev-parse", "--short", "HEAD")
        + ("+uncommitted-src" if git("status", "--porcelain", "src") else ""),
    }


def all_ok(node: object) -> bool:
    """True unless some ``ok`` in the tree is False (``None``: no target)."""
    if isinstance(node, dict):
        return node.get("ok") is not False and all(all_ok(v) for v in node.values())
    if isinstance(node, list):
        return all(all_ok(v) for v in node)
    return True


def options(
    description: str,
    argv: list[str] | None,
    more: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.Namespace:
    """The options every benchmark takes: ``--quick`` and ``-o FILE`` (``more`` adds its own)."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke check)")
    parser.add_argument("-o", "--output", type=Path, help="also write the JSON to this file")
    if more is not None:
        more(parser)
    return parser.parse_args(argv)


def emit(result: Json, start: float, output: Path | None) -> None:
    """Finish the result (load at the end, all_ok, elapsed), print it, maybe save it."""
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["all_ok"] = all_ok(result)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        output.write_text(text + "\n")
