"""devanon's core costs, each beside a baseline measured in the same run, and the ratio.

What is measured (every timing: ``time.perf_counter_ns`` around each repetition, the
garbage collector paused, devanon and baseline repetitions interleaved in rotating order;
the median and the min are reported, ratios are of medians):

(a) ``map_write_unmap``: ``Anon.map`` + ``ctypes.memset`` of every byte + ``Mapping.close``
    (which unmaps and, the count being 0, punches) for 4 KiB, 2 MiB and 1 GiB (each in an
    Anon of its size; then 4 KiB inside a 256 MiB Anon, alone and among 1,000 mappings),
    against
    ``mmap(MAP_SHARED)`` of a memfd + the same memset + ``munmap`` + ``fallocate(PUNCH_HOLE)``
    through ctypes (``_raw``: what Python offers without devanon). Targets: devanon/raw
    <= 1.5 at 4 KiB, <= 1.1 at 1 GiB. Beside it, the same raw calls through devanon's own
    bindings (cffi, ``devanon._libc``): the ratio to those is devanon's bookkeeping alone.
    At 1 GiB both sides are page faults; in a VM that reports free pages to its host they
    vary from one repetition to the next, so the samples are listed too.
(b) ``count_update``: ``MapCounts.add`` and ``MapCounts.remove`` of a 1 GiB page range, on
    fresh counts and on counts already split into ~10,000 runs, against a per-page Python
    loop over a list of counters (the RFC's algorithm: increment every page, then decrement
    every page and collect those that reach 0). Target: <= 150 us and >= 50x faster.
(c) ``release``: giving back 1 GiB of written memory, timing only ``Mapping.close()``
    against only ``munmap`` + one ``fallocate(PUNCH_HOLE)``. Target: >= 90% of raw GiB/s.
(d) ``count_memory``: what the map counts take (``Anon.stats().count_bytes``, i.e.
    ``MapCounts.nbytes()``) for an unmapped 1 TiB Anon (with a tracemalloc cross-check),
    1 GiB as one mapping, as 512 mappings of 2 MiB, and the worst case for runs: isolated
    single-page mappings (every other page). Target: < 1 MiB for the TiB, <= 1 MiB per GiB
    mapped. Beside it, the kernel's cost for the same mappings, estimated as VMAs added
    (``/proc/self/maps`` lines) x ``vm_area_struct`` size, and devanon's whole Python
    bookkeeping measured with tracemalloc.

Run from the repository root (full: a minute or two, 2 GiB of RAM at the peak)::

    .venv/bin/python benchmarks/core.py [--quick] [-o FILE]

``--quick`` is a smoke check of about ten seconds: fewer repetitions, and 256 MiB in place
of 1 GiB in (a) and (c), so its figures are not the ones to quote.
The JSON goes to stdout (and to FILE with ``-o``); progress goes to stderr.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import _raw
from _common import Json, emit, gc_paused, log, machine, options, us

import devanon
from devanon import _libc
from devanon.counts import MapCounts

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PAGE = devanon.PAGE_SIZE
PUNCH = _libc.FALLOC_FL_PUNCH_HOLE | _libc.FALLOC_FL_KEEP_SIZE
PROT_RW = _libc.PROT_READ | _libc.PROT_WRITE
VMA_BYTES_FALLBACK = 200
"""Assumed sizeof(vm_area_struct) where /proc/slabinfo can't be read."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Config:
    """Repetitions for one run."""

    big: int
    """The large size of (a) and (c): 1 GiB (256 MiB with --quick)."""
    reps_by_size: dict[int, int]
    count_reps: int
    count_budget_s: float
    loop_reps: int
    release_reps: int
    worst_maps: int


FULL = Config(GiB, {4 * KiB: 3000, 2 * MiB: 300, GiB: 11}, 2000, 2.0, 5, 7, 30000)
QUICK = Config(256 * MiB, {4 * KiB: 300, 2 * MiB: 30, 256 * MiB: 1}, 200, 0.3, 1, 1, 3000)


# -- helpers ------------------------------------------------------------------------------


def samples_ms(**samples_ns: list[int]) -> dict[str, list[float]]:
    """Every sample in milliseconds, in the order taken (for the few slow repetitions)."""
    return {name: [round(t / 1e6, 1) for t in ns] for name, ns in samples_ns.items()}


def interleave(reps: int, *timers: Callable[[], int]) -> list[list[int]]:
    """Run each timed callable ``reps`` times, rotating which goes first; samples per timer."""
    samples: list[list[int]] = [[] for _ in timers]
    for i in range(reps):
        for j in range(len(timers)):
            k = (i + j) % len(timers)
            samples[k].append(timers[k]())
    return samples


def raw_memfd(size: int) -> int:
    """A plain memfd of ``size`` bytes: the baseline's backing file."""
    fd = os.memfd_create("bench-raw", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def resident(fd: int) -> int:
    """Bytes the kernel holds for a file."""
    return os.fstat(fd).st_blocks * 512


def size_label(n: int) -> str:
    """4 KiB, 2 MiB, 1 GiB."""
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


def map_lines(memfd: str = "") -> int:
    """How many mappings this process holds (of ``memfd`` only, if named)."""
    needle = f"/memfd:{memfd} ".encode()
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for line in f if not memfd or needle in line)


def slab_objsize(name: str) -> int | None:
    """Object size of a kernel slab cache, from /proc/slabinfo (root only)."""
    try:
        with open("/proc/slabinfo", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == name:
                    return int(fields[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- (a) map + write + unmap ----------------------------------------------------------------


def devanon_cycle(anon: devanon.Anon, size: int, offset: int = 0) -> int:
    """Time map, memset, close (unmap + punch) through devanon."""
    t0 = time.perf_counter_ns()
    m = anon.map(offset, size)
    ctypes.memset(m.address, 1, size)
    m.close()
    return time.perf_counter_ns() - t0


def raw_cycle(calls: ModuleType, fd: int, size: int, offset: int = 0) -> int:
    """Time the same with the raw syscalls: through ctypes (``_raw``, the baseline) or
    through devanon's own bindings (``devanon._libc``, cffi)."""
    t0 = time.perf_counter_ns()
    address = calls.mmap(0, size, PROT_RW, _libc.MAP_SHARED, fd, offset)
    ctypes.memset(address, 1, size)
    calls.munmap(address, size)
    calls.fallocate(fd, PUNCH, offset, size)
    return time.perf_counter_ns() - t0


@dataclass(frozen=True, slots=True)
class Setting:
    """Where (a) maps: ``size`` bytes at ``offset`` of an Anon (and memfd) of ``file_size``,
    with ``crowd`` single-page mappings held elsewhere in the Anon meanwhile."""

    label: str
    size: int
    file_size: int
    offset: int = 0
    crowd: int = 0
    target: float | None = None


CROWD_STRIDE = 40
"""Pages between the crowd's mappings (2 runs each, 205 to a 4096-page chunk: runs, not
dense)."""


def settings(cfg: Config) -> list[Setting]:
    """(a)'s rows: each size in an Anon of its own size, then 4 KiB inside a 256 MiB one,
    alone and among 1,000 mappings (where map and unmap split and merge runs)."""
    rows = [
        Setting(size_label(size), size, size, target={4 * KiB: 1.5, cfg.big: 1.1}.get(size))
        for size in cfg.reps_by_size
    ]
    inner = (CROWD_STRIDE * 500 + 7) * PAGE
    return [
        *rows,
        Setting("4 KiB inside 256 MiB", 4 * KiB, 256 * MiB, inner, target=1.5),
        Setting("4 KiB among 1,000 mappings", 4 * KiB, 256 * MiB, inner, crowd=1000),
    ]


def bench_setting(setting: Setting, reps: int, big: bool) -> Json:
    """One row of (a): devanon, raw through ctypes and raw through cffi, interleaved."""
    size, offset = setting.size, setting.offset
    log(f"(a) map+write+unmap {setting.label} x {reps}")
    fd = raw_memfd(setting.file_size)
    try:
        with devanon.Anon(setting.file_size, name="bench-devanon") as anon, gc_paused():
            crowd = [anon.map(CROWD_STRIDE * i * PAGE, PAGE) for i in range(setting.crowd)]
            timers = [
                partial(devanon_cycle, anon, size, offset),
                partial(raw_cycle, _raw, fd, size, offset),
                partial(raw_cycle, _libc, fd, size, offset),
            ]
            if not big:
                interleave(max(1, reps // 10), *timers)  # warm-up
            else:
                # Warm the pages the kernel will hand out: under free page reporting,
                # pages long free fault in the host too.
                raw_cycle(_raw, fd, size)
            dev, raw, ffi = interleave(reps, *timers)
            runs = anon.stats().count_runs
            for m in crowd:
                m.close()
            left = anon.resident_bytes(), resident(fd)
    finally:
        os.close(fd)
    if left != (0, 0):
        raise AssertionError(f"{setting.label}: bytes left after punch: {left}")
    (dev_us, dev_min), (raw_us, raw_min), (ffi_us, ffi_min) = us(dev), us(raw), us(ffi)
    ratio = dev_us / raw_us
    row: Json = {
        "size": size,
        "size_label": setting.label,
        "anon_size": setting.file_size,
        "offset": offset,
        "other_mappings": setting.crowd,
        "count_runs": runs,
        "reps": reps,
        "devanon_us": round(dev_us, 2),
        "devanon_min_us": round(dev_min, 2),
        "raw_us": round(raw_us, 2),
        "raw_min_us": round(raw_min, 2),
        "ratio": round(ratio, 3),
        "ratio_of_mins": round(dev_min / raw_min, 3),
        "target": None if setting.target is None else f"ratio <= {setting.target}",
        "ok": None if setting.target is None else ratio <= setting.target,
        "raw_cffi_us": round(ffi_us, 2),
        "raw_cffi_min_us": round(ffi_min, 2),
        "ratio_to_raw_cffi": round(dev_us / ffi_us, 3),
    }
    if big:
        row["samples_ms"] = samples_ms(devanon=dev, raw=raw, raw_cffi=ffi)
    return row


def bench_map_write_unmap(cfg: Config) -> Json:
    """(a): devanon's map/write/unmap against the raw syscalls."""
    rows = [bench_setting(s, cfg.reps_by_size[s.size], s.size == cfg.big) for s in settings(cfg)]
    return {
        "what": "map + ctypes.memset of every byte + unmap + punch; devanon: Anon.map, "
        "Mapping.close; raw (the baseline): mmap(MAP_SHARED) of a memfd, munmap, one "
        "fallocate(PUNCH_HOLE) through ctypes; raw_cffi: the same calls through devanon's "
        "own bindings (devanon._libc, cffi), so ratio_to_raw_cffi is devanon's bookkeeping "
        "alone. devanon makes the same syscalls (MADV_DONTFORK waits for a fork). The "
        "memfd has the Anon's size and the same offset is mapped; count_runs is while the "
        "other mappings are held",
        "sizes": rows,
    }


# -- (b) count update ---------------------------------------------------------------------


def loop_add(counts: list[int], start: int, stop: int) -> None:
    """The per-page algorithm: every page gains one count."""
    for page in range(start, stop):
        counts[page] += 1


def loop_remove(counts: list[int], start: int, stop: int) -> list[int]:
    """The per-page algorithm: every page loses one; returns the pages now at 0."""
    zeros = []
    for page in range(start, stop):
        count = counts[page] - 1
        counts[page] = count
        if count == 0:
            zeros.append(page)
    return zeros


def speed_row(dev: list[int], loop: list[int], *, max_us: float, min_speedup: float) -> Json:
    """One timed operation beside its per-page baseline."""
    (dev_us, dev_min), (loop_us, loop_min) = us(dev), us(loop)
    speedup = loop_us / dev_us
    return {
        "devanon_us": round(dev_us, 2),
        "devanon_min_us": round(dev_min, 2),
        "loop_us": round(loop_us, 1),
        "loop_min_us": round(loop_min, 1),
        "speedup": round(speedup, 1),
        "target": f"devanon_us <= {max_us:g} and speedup >= {min_speedup:g}",
        "ok": dev_us <= max_us and speedup >= min_speedup,
    }


def bench_count_update(cfg: Config) -> Json:
    """(b): MapCounts.add/remove of 1 GiB against the per-page loop."""
    npages = GiB // PAGE
    scattered = 5000
    step = npages // scattered
    cases: dict[str, list[int]] = {
        "fresh": [],
        "10000_runs": [step // 2 + i * step for i in range(scattered)],
    }
    out: Json = {
        "what": f"add(0, {npages}) then remove(0, {npages}) pages (1 GiB); baseline: a Python "
        "list of per-page counters, incremented page by page, then decremented page by page "
        "collecting the pages that reach 0",
        "reps": f"up to {cfg.count_reps}, at least 10, within {cfg.count_budget_s:g} s a case",
        "cases": {},
    }
    for name, pages in cases.items():
        log(f"(b) count update, {name}")
        counts = MapCounts(npages)
        per_page = [0] * npages
        for page in pages:
            counts.add(page, page + 1)
            per_page[page] += 1
        runs = counts.nruns()
        add: list[int] = []
        remove: list[int] = []
        both: list[int] = []
        deadline = time.perf_counter_ns() + int(cfg.count_budget_s * 1e9)
        with gc_paused():
            while len(both) < cfg.count_reps and (
                len(both) < 10 or time.perf_counter_ns() < deadline
            ):
                t0 = time.perf_counter_ns()
                counts.add(0, npages)
                t1 = time.perf_counter_ns()
                zeros = counts.remove(0, npages)
                t2 = time.perf_counter_ns()
                add.append(t1 - t0)
                remove.append(t2 - t1)
                both.append(t2 - t0)
            loop_a: list[int] = []
            loop_r: list[int] = []
            loop_b: list[int] = []
            for _ in range(cfg.loop_reps):
                t0 = time.perf_counter_ns()
                loop_add(per_page, 0, npages)
                t1 = time.perf_counter_ns()
                loop_zeros = loop_remove(per_page, 0, npages)
                t2 = time.perf_counter_ns()
                loop_a.append(t1 - t0)
                loop_r.append(t2 - t1)
                loop_b.append(t2 - t0)
        zero_pages = sum(b - a for a, b in zeros)
        if zero_pages != len(loop_zeros) or counts.nruns() != runs:
            raise AssertionError(f"{name}: MapCounts and the per-page loop disagree")
        limits = {"max_us": 150.0, "min_speedup": 50.0}
        out["cases"][name] = {
            "runs_before": runs,
            "zero_ranges_returned": len(zeros),
            "reps": len(both),
            "loop_reps": cfg.loop_reps,
            "add": speed_row(add, loop_a, **limits),
            "remove": speed_row(remove, loop_r, **limits),
            "add_plus_remove": speed_row(both, loop_b, **limits),
        }
    return out


# -- (c) release ----------------------------------------------------------------------------


def devanon_release(anon: devanon.Anon, size: int) -> int:
    """Map and write ``size`` bytes; time only the close (munmap + punch)."""
    m = anon.map(0, size)
    ctypes.memset(m.address, 1, size)
    if anon.resident_bytes() != size:
        raise AssertionError("devanon: the write did not populate the file")
    t0 = time.perf_counter_ns()
    m.close()
    return time.perf_counter_ns() - t0


def raw_release(fd: int, size: int) -> int:
    """Map and write ``size`` bytes; time only munmap + one fallocate punch."""
    address = _raw.mmap(0, size, PROT_RW, _libc.MAP_SHARED, fd, 0)
    ctypes.memset(address, 1, size)
    if resident(fd) != size:
        raise AssertionError("raw: the write did not populate the file")
    t0 = time.perf_counter_ns()
    _raw.munmap(address, size)
    _raw.fallocate(fd, PUNCH, 0, size)
    return time.perf_counter_ns() - t0


def bench_release(cfg: Config) -> Json:
    """(c): throughput of giving back 1 GiB (--quick: 256 MiB) of written memory."""
    size = cfg.big
    log(f"(c) release {size_label(size)} x {cfg.release_reps}")
    fd = raw_memfd(size)
    try:
        with devanon.Anon(size, name="bench-devanon") as anon, gc_paused():
            dev, raw = interleave(
                cfg.release_reps,
                partial(devanon_release, anon, size),
                partial(raw_release, fd, size),
            )
            left = anon.resident_bytes(), resident(fd)
            punch_calls = anon.stats().punch_calls
    finally:
        os.close(fd)
    if left != (0, 0):
        raise AssertionError(f"release: bytes left after punch: {left}")
    (dev_us, dev_min), (raw_us, raw_min) = us(dev), us(raw)
    dev_gibps, raw_gibps = size / GiB * 1e6 / dev_us, size / GiB * 1e6 / raw_us
    ratio = dev_gibps / raw_gibps
    return {
        "what": f"{size_label(size)} mapped and written (memset); timed: devanon "
        "Mapping.close() against raw munmap + one fallocate(PUNCH_HOLE) of all of it",
        "size": size,
        "reps": cfg.release_reps,
        "devanon_us": round(dev_us, 1),
        "devanon_min_us": round(dev_min, 1),
        "raw_us": round(raw_us, 1),
        "raw_min_us": round(raw_min, 1),
        "devanon_gib_per_s": round(dev_gibps, 2),
        "raw_gib_per_s": round(raw_gibps, 2),
        "devanon_punch_calls_per_release": punch_calls // cfg.release_reps,
        "ratio": round(ratio, 3),
        "ratio_of_best_throughputs": round(raw_min / dev_min, 3),
        "target": "ratio (devanon / raw throughput) >= 0.9",
        "ok": ratio >= 0.9,
        "samples_ms": samples_ms(devanon=dev, raw=raw),
    }


# -- (d) count memory -----------------------------------------------------------------------


def traced(make: Callable[[], T]) -> tuple[T, int]:
    """Call ``make`` under tracemalloc; returns its result and the bytes it left allocated."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = make()
        gc.collect()
        return result, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def bench_tib_unmapped() -> Json:
    """The map counts of a 1 TiB Anon with nothing mapped."""
    bare = MapCounts(TiB // PAGE).nbytes()
    anon, python_bytes = traced(lambda: devanon.Anon(TiB, name="bench-tib"))
    with anon:
        stats = anon.stats()
    return {
        "count_runs": stats.count_runs,
        "count_bytes": stats.count_bytes,
        "mapcounts_nbytes": bare,
        "python_bytes_tracemalloc": python_bytes,
        "target": "count_bytes < 1 MiB and python_bytes_tracemalloc < 1 MiB",
        "ok": stats.count_bytes < MiB and python_bytes < MiB,
    }


def bench_mapped(offsets: list[int], length: int, vma_bytes: int) -> Json:
    """Count bytes (and the kernel's estimated cost) with one mapping per offset."""
    anon = devanon.Anon(8 * GiB, name="bench-counts")
    held: list[devanon.Mapping | None] = [None] * len(offsets)
    try:

        def make() -> None:
            for i, offset in enumerate(offsets):
                held[i] = anon.map(offset, length)

        _, python_bytes = traced(make)
        vmas = map_lines("bench-counts")
        stats = anon.stats()
    finally:
        held.clear()
        anon.close()
    mapped = stats.mapped_bytes
    per_gib = stats.count_bytes * GiB / mapped
    return {
        "mappings": len(offsets),
        "mapping_bytes": length,
        "mapped_bytes": mapped,
        "span_bytes": offsets[-1] + length - offsets[0],
        "count_runs": stats.count_runs,
        "count_bytes": stats.count_bytes,
        "count_bytes_per_gib_mapped": round(per_gib),
        "count_bytes_per_mapping": round(stats.count_bytes / len(offsets), 1),
        "python_books_bytes_tracemalloc": python_bytes,
        "python_books_bytes_per_mapping": round(python_bytes / len(offsets)),
        "kernel_vmas_added": vmas,
        "kernel_vma_bytes_estimate": vmas * vma_bytes,
        "target": "count_bytes_per_gib_mapped <= 1 MiB",
        "ok": per_gib <= MiB,
    }


def bench_count_memory(cfg: Config) -> Json:
    """(d): memory the map counts take, beside the kernel's cost for the same mappings."""
    log("(d) count memory")
    vma_size = slab_objsize("vm_area_struct")
    vma_bytes = vma_size or VMA_BYTES_FALLBACK
    base = GiB  # mappings start 1 GiB into an 8 GiB Anon, so runs have neighbours both sides
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    worst = min(cfg.worst_maps, limit - map_lines() - 1000)
    log(f"(d) worst case: {worst} single-page mappings")
    return {
        "what": "Anon.stats().count_bytes (= MapCounts.nbytes(): 16 bytes a run, a byte a "
        "page of a dense chunk, array lengths without over-allocation); mappings made (not "
        "written) in an 8 GiB Anon from offset 1 GiB; kernel cost estimated as the memfd's "
        "/proc/self/maps lines x "
        f"sizeof(vm_area_struct) = {vma_bytes} "
        f"({'from /proc/slabinfo' if vma_size else 'assumed'}), without maple tree nodes "
        "or page tables; python_books: devanon's whole bookkeeping (Mapping, segment, "
        "counts) as tracemalloc sees it",
        "unmapped_1tib": bench_tib_unmapped(),
        "one_1gib_mapping": bench_mapped([base], GiB, vma_bytes),
        "512_mappings_of_2mib": bench_mapped(
            [base + i * 2 * MiB for i in range(512)], 2 * MiB, vma_bytes
        ),
        "worst_single_pages": {
            "pattern": f"{worst} single-page mappings of every other page (counts 1, 0, 1, "
            "0, ...: ubd-mmap's pattern; as runs, 32 bytes a mapped page, so these chunks "
            f"turn dense: a byte a page); max_map_count is {limit}",
            **bench_mapped([base + 2 * i * PAGE for i in range(worst)], PAGE, vma_bytes),
        },
        "sparse_single_pages": {
            "pattern": f"{worst} single-page mappings of every {SPARSE_STRIDE}th page: the "
            "densest pattern still kept as runs (a dense chunk would cost as much), so the "
            "most count memory per mapped byte",
            **bench_mapped(
                [base + SPARSE_STRIDE * i * PAGE for i in range(worst)], PAGE, vma_bytes
            ),
            "target": None,
            "ok": None,
        },
    }


SPARSE_STRIDE = 32
"""One mapped page in this many: runs (32 bytes a mapped page) cost what per-page counts
would (a byte a page x 32)."""


# -- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark and print the JSON."""
    args = options(__doc__, argv)
    cfg = QUICK if args.quick else FULL
    start = time.perf_counter()
    result: Json = {
        "benchmark": "devanon core",
        "quick": args.quick,
        "machine": machine(),
        "map_write_unmap": bench_map_write_unmap(cfg),
        "count_update": bench_count_update(cfg),
        "release": bench_release(cfg),
        "count_memory": bench_count_memory(cfg),
    }
    emit(result, start, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
