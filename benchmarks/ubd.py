"""ubd replay speed: mmap mode beside copy mode (the baseline), measured in the same run.

Workload: the default of ``devanon demo`` (the shipped trace of real programs starting up,
replayed on an image of this Python's standard library; see ``devanon.demo.workload``), or
``--rootfs DIR --trace FILE``. One guest, in this process, boots the trace: other memory
written, then every read served by the guest page cache and the ubd device, and the bytes
consumed (a CRC through guest memory).

Two cases, repetitions of copy and mmap interleaved (order rotating), the garbage collector
paused, ``time.perf_counter`` around the replay only:

- ``cold``: the image's page cache dropped first (``POSIX_FADV_DONTNEED``, checked with
  ``mincore``): what a booting guest sees. The disk reads dominate both modes.
- ``warm``: the image already cached (another guest booted it): the cost of the device
  itself, ``preadv`` copies against overlays (``mmap`` + ``madvise``) and page faults.

Reported per mode and case: median and min seconds, pages filled per second (page-cache
misses / median), ``read_calls`` (preadv calls or overlays), the VMAs the guest memory
ended up in; and ``ratio`` = mmap median / copy median (target: <= 1.5).

Run from the repository root (about half a minute)::

    .venv/bin/python benchmarks/ubd.py [--repeat N] [-o FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from devanon import measure
from devanon.demo.runs import Workload, load_workload
from devanon.demo.workload import cache_dir
from devanon.guest.machine import Guest
from devanon.ubd import Mode


def boot(workload: Workload, mode: Mode, memory: int) -> dict[str, Any]:
    """One guest boots the trace; returns the replay's time and figures."""
    plan = workload.plan
    with Guest.create(workload.image, mode, memory, name="devanon-bench") as guest:
        guest.add_other_memory(plan.guest_other_bytes)
        gc.disable()
        try:
            start = time.perf_counter()
            result = guest.replay(plan)
            seconds = time.perf_counter() - start
        finally:
            gc.enable()
        return {
            "seconds": seconds,
            "pages": result.page_misses,
            "crc": result.crc,
            "read_calls": guest.device.stats.read_calls,
            "vmas": guest.memory.vmas(),
        }


def run(workload: Workload, repeat: int, memory: int) -> dict[str, Any]:
    modes = [Mode.COPY, Mode.MMAP]
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        case: {m.value: [] for m in modes} for case in ("cold", "warm")
    }
    for i in range(repeat):
        order = modes if i % 2 == 0 else modes[::-1]
        for mode in order:
            left = measure.drop_file_cache(workload.image)
            if left:
                raise RuntimeError(f"{left} bytes of the image stayed cached")
            samples["cold"][mode.value].append(boot(workload, mode, memory))
            samples["warm"][mode.value].append(boot(workload, mode, memory))
            print(f"round {i + 1}/{repeat}: {mode.value}", file=sys.stderr)
    out: dict[str, Any] = {}
    crcs = {s["crc"] for case in samples.values() for runs in case.values() for s in runs}
    for case, by_mode in samples.items():
        figures = {}
        for mode, runs in by_mode.items():
            times = [s["seconds"] for s in runs]
            median = statistics.median(times)
            figures[mode] = {
                "median_s": round(median, 4),
                "min_s": round(min(times), 4),
                "samples_s": [round(t, 4) for t in times],
                "pages_filled": runs[0]["pages"],
                "pages_per_s": round(runs[0]["pages"] / median),
                "read_calls": runs[0]["read_calls"],
                "vmas": runs[0]["vmas"],
            }
        figures["ratio"] = round(figures["mmap"]["median_s"] / figures["copy"]["median_s"], 3)
        figures["baseline"] = "copy"
        figures["target"] = "ratio <= 1.5"
        out[case] = figures
    out["same_bytes_read_in_both_modes"] = len(crcs) == 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory", type=int, default=256 << 20)
    parser.add_argument("--rootfs")
    parser.add_argument("--trace")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    workload = load_workload(args.rootfs, args.trace, cache_dir())
    result = {
        "benchmark": "ubd replay, mmap mode against copy mode",
        "workload": {
            "trace": str(workload.trace_path),
            "image": str(workload.image),
            "reads": workload.plan.reads,
            "distinct_bytes": workload.plan.distinct_bytes,
            "guest_other_bytes": workload.plan.guest_other_bytes,
        },
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        **run(workload, args.repeat, args.memory),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with tempfile.NamedTemporaryFile(
            "w", dir=os.path.dirname(args.output) or ".", delete=False
        ) as f:
            f.write(text + "\n")
        os.replace(f.name, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
