"""``devanon demo``: the RFC's experiment, on today's Linux, measured by the kernel.

``run(options)`` does the runs (``devanon.demo.runs``), builds the result
(``devanon.demo.report``), and shows it: JSON, or a table with progress bars on a terminal
(plain lines otherwise), and a plot if asked.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from devanon.demo import report
from devanon.demo.runs import (
    Curve,
    DemoError,
    Density,
    estimate_density,
    have_cgroup,
    load_workload,
    run_curve,
    run_density,
)
from devanon.ubd import Mode

__all__ = ["DemoError", "DemoOptions", "run"]


@dataclass(slots=True, frozen=True)
class DemoOptions:
    """The demo's flags (see ``devanon demo --help``)."""

    guests: int = 8
    modes: tuple[Mode, ...] = (Mode.COPY, Mode.MMAP)
    rootfs: str | None = None
    trace: str | None = None
    memory: int = 256 << 20
    budget: int = 1 << 30
    density: bool = True
    json: bool = False
    plot: str | None = None


def check(options: DemoOptions) -> None:
    """Refuse bad options before anything starts (ValueError naming the value)."""
    if options.guests < 1:
        raise ValueError(f"--guests must be at least 1, not {options.guests}")
    if options.memory <= 0 or options.memory % 4096:
        raise ValueError(f"--memory must be a positive multiple of 4K, not {options.memory}")
    if options.budget <= 0:
        raise ValueError(f"--budget must be positive, not {options.budget}")
    if options.plot:  # now, not after minutes of runs
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "--plot needs matplotlib: pip install 'devanon[plot]' (scripts/setup installs it)"
            )
        where = os.path.dirname(os.path.abspath(options.plot))
        if os.path.isdir(options.plot):
            raise ValueError(f"--plot {options.plot} is a directory, not a file to write")
        if not os.access(where, os.W_OK | os.X_OK):
            raise ValueError(f"--plot {options.plot}: cannot write in {where}")


def run(options: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    """Run the demo; print JSON or a table; returns the result dict."""
    from devanon.demo.workload import cache_dir

    check(options)
    console = console or Console(stderr=options.json)
    workload = load_workload(options.rootfs, options.trace, cache_dir())
    plan = workload.plan
    largest = max(plan.read_length, default=0)
    floor = plan.guest_other_bytes + (-(-largest // plan.page_size) + 1) * plan.page_size
    if options.memory < floor:
        raise DemoError(
            f"--memory {options.memory} cannot hold a guest: its other memory "
            f"({plan.guest_other_bytes}) and the page cache for its largest read ({largest} "
            f"bytes) need {floor}"
        )
    needed = plan.guest_other_bytes + plan.distinct_bytes
    if needed > options.memory:
        console.print(
            f"[yellow]note:[/] guest memory {options.memory} < other memory + distinct reads "
            f"({needed}): the guest page cache will evict"
        )
    cgroup_ok, how = have_cgroup()
    measured_by = (
        f"memory.stat of a fresh {how}"
        if cgroup_ok
        else f"no memory cgroup ({how}): the image's page cache by mincore, the guests' "
        "Anons by st_blocks, their processes by smaps_rollup Pss_Anon; density estimated "
        "from the per-guest cost, not measured"
    )
    if not cgroup_ok:
        console.print(f"[yellow]not measured by a cgroup:[/] {measured_by}")
    curves: dict[str, Curve] = {}
    densities: dict[str, Density] = {}
    scratch = "/var/tmp" if os.path.isdir("/var/tmp") else None  # a disk, not tmpfs, if any
    with (
        tempfile.TemporaryDirectory(prefix="devanon-demo-", dir=scratch) as work,
        _progress(console, quiet=options.json and not console.is_terminal) as progress,
    ):
        for mode in options.modes:
            curves[mode.value] = run_curve(
                workload, mode, options.guests, options.memory, work, progress
            )
        if options.density:
            for mode in options.modes:
                if cgroup_ok:
                    densities[mode.value] = run_density(
                        workload, mode, options.budget, options.memory, work, progress
                    )
                else:
                    densities[mode.value] = estimate_density(curves[mode.value], options.budget)
    result = report.build(
        workload,
        curves,
        densities,
        measured_by=measured_by,
        memory=options.memory,
        budget=options.budget,
    )
    if options.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        _show(console, result, options)
    if options.plot:  # after the figures are out: a plot that fails loses none of them
        from devanon.demo.plot import plot

        plot(result, options.plot)
    return result


def _show(console: Console, result: dict[str, Any], options: DemoOptions) -> None:
    cols, rows = report.table_rows(result)
    table = Table(title="devanon demo: host memory as the kernel charges it")
    for i, c in enumerate(cols):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for line in report.summary_lines(result):
        console.print(line, highlight=False)
    if options.plot:
        console.print(f"plot: {options.plot}")


@contextmanager
def _progress(console: Console, quiet: bool) -> Iterator[Any]:
    """A ``progress(phase, done, total)`` callback: rich bars on a terminal, lines elsewhere."""
    if quiet:
        yield None
        return
    if not console.is_terminal:
        seen: set[str] = set()

        def plain(phase: str, done: int, total: int) -> None:
            if (total and done == total) or phase not in seen:
                seen.add(phase)
                console.print(f"{phase}: {done}{f'/{total}' if total else ''}", highlight=False)

        yield plain
        return
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total or None)
        bars.update(tasks[phase], completed=done)

    with bars:
        yield update
