"""``devanon demo``: guests on one image, in copy and mmap mode, measured by the kernel.

For each mode, two runs, each in a fresh memory cgroup (as root) with the image's page
cache dropped first (and checked with ``mincore``):

1. **Host memory against guests**: guests start one at a time; after each has booted
   (other memory written, trace replayed) the cgroup's ``memory.stat`` is read.
2. **Density**: guests start one at a time in a cgroup limited to the budget until one
   does not fit. "Does not fit" is the kernel's word: the cgroup's ``oom_kill`` count
   rises (or the new guest dies). With no swap the OOM killer often kills an older, larger
   guest rather than the new one, so ``failcnt`` or the new guest's fate alone would not
   tell (DESIGN.md). The density is the number of guests that were all alive before it.

Without root there is no cgroup: the figures come from ``mincore`` (the image's page cache),
``st_blocks`` (the guests' Anons) and ``smaps_rollup`` (their processes' anonymous memory),
and the density is estimated from the per-guest cost, not measured. The report says so.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devanon import cgroups, measure
from devanon.guest.fleet import Fleet, FleetConfig, GuestReport
from devanon.guest.plan import Plan
from devanon.image import Manifest, cached_image
from devanon.measure import MemorySample
from devanon.trace import Trace, load_trace
from devanon.ubd import Mode

DENSITY_CAP = 500
"""The most guests a density run starts (a budget far larger than the machine's RAM...)."""

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``; total 0 when not known in advance."""


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message says why and what to do."""


@dataclass(slots=True)
class Workload:
    """What every guest boots: an image of a root, and a trace compiled against it."""

    rootfs: Path
    trace_path: Path
    trace: Trace
    image: Path
    manifest: Manifest
    plan: Plan
    default: bool
    note: str = ""


@dataclass(slots=True)
class Curve:
    """Host memory after each guest booted, in one mode."""

    mode: Mode
    samples: list[MemorySample] = field(default_factory=list)
    reports: list[GuestReport] = field(default_factory=list)
    cached_before: int = 0
    """Bytes of the image still cached when the run began (0: cold)."""


@dataclass(slots=True)
class Density:
    """How many guests fit under the budget, in one mode."""

    mode: Mode
    guests: int
    measured: bool
    started: int = 0
    oom_kills: int = 0
    survivors: int = 0
    hit_cap: bool = False
    last: MemorySample | None = None
    """Host memory with ``guests`` guests booted (the last that all fit)."""


def run_curve(
    workload: Workload,
    mode: Mode,
    guests: int,
    memory: int,
    workdir: str,
    progress: Progress | None = None,
) -> Curve:
    """Start ``guests`` guests one at a time; sample host memory after each."""
    curve = Curve(mode)
    group = _cgroup(f"devanon-demo-{mode.value}", None)
    try:
        curve.cached_before = measure.drop_file_cache(workload.image)
        with _fleet(workload, mode, memory, workdir, group) as fleet:
            for k in range(guests):
                report = fleet.start()
                if not report.booted:
                    raise DemoError(
                        f"guest {k} died while booting in {mode.value} mode (signal "
                        f"{report.signal}): is the machine out of memory?"
                    )
                curve.reports.append(report)
                curve.samples.append(_sample(workload, group, curve.reports))
                if progress:
                    progress(f"{mode.value}: {guests} guests", k + 1, guests)
    finally:
        if group is not None:
            group.remove()
    return curve


def run_density(
    workload: Workload,
    mode: Mode,
    budget: int,
    memory: int,
    workdir: str,
    progress: Progress | None = None,
    cap: int = DENSITY_CAP,
) -> Density:
    """Start guests under a cgroup limit of ``budget`` until one does not fit."""
    group = _cgroup(f"devanon-density-{mode.value}", budget)
    if group is None:
        raise DemoError("measuring density needs a memory cgroup (root)")
    try:
        measure.drop_file_cache(workload.image)
        fitted = 0
        last: MemorySample | None = None
        with _fleet(workload, mode, memory, workdir, group) as fleet:
            while fitted < cap:
                report = fleet.start()
                kills = group.oom_kills()
                if not report.booted or kills:
                    break
                fitted += 1
                last = measure.cgroup_sample(group)
                if progress:
                    progress(f"{mode.value}: density under the budget", fitted, 0)
            survivors = len(fleet.alive())
            return Density(
                mode,
                fitted,
                True,
                started=fleet.started,
                oom_kills=group.oom_kills(),
                survivors=survivors,
                hit_cap=fitted >= cap,
                last=last,
            )
    finally:
        group.remove()


def estimate_density(curve: Curve, budget: int) -> Density:
    """Guests that would fit, from a curve's first-guest and per-added-guest costs."""
    totals = [s.total_bytes for s in curve.samples]
    first = totals[0]
    added = (totals[-1] - first) / (len(totals) - 1) if len(totals) > 1 else first
    guests = 0 if first > budget else 1 + int((budget - first) // max(added, 1))
    return Density(curve.mode, guests, False)


def have_cgroup() -> tuple[bool, str]:
    """Whether a memory cgroup can be made here, and which (or why not)."""
    try:
        version, parent = cgroups.find_parent()
    except OSError as e:
        return False, str(e.strerror or e)
    return True, f"cgroup v{version} memory controller, under {parent}"


def _cgroup(name: str, limit: int | None) -> cgroups.Cgroup | None:
    if not have_cgroup()[0]:
        return None
    return cgroups.Cgroup.create(name, limit=limit)


def _fleet(
    workload: Workload, mode: Mode, memory: int, workdir: str, group: cgroups.Cgroup | None
) -> Fleet:
    plan_file = os.path.join(workdir, "plan.bin")
    if not os.path.exists(plan_file):
        workload.plan.save(plan_file)
    cow_dir = tempfile.mkdtemp(prefix=f"cow-{mode.value}-", dir=workdir)
    return Fleet(
        FleetConfig(
            image=str(workload.image),
            plan=plan_file,
            mode=mode,
            memory=memory,
            workdir=cow_dir,
            cgroup_procs=str(group.procs_file) if group else None,
        )
    )


def _sample(
    workload: Workload, group: cgroups.Cgroup | None, reports: list[GuestReport]
) -> MemorySample:
    if group is not None:
        return measure.cgroup_sample(group)
    return measure.sample_without_cgroup(
        workload.image,
        sum(r.anon_resident_bytes for r in reports),
        [r.pid for r in reports],
    )


def load_workload(
    rootfs: str | None, trace: str | None, cache: Path, record_if_needed: bool = True
) -> Workload:
    """The image and plan to boot; every check is made here, before anything starts."""
    from devanon.demo import workload as default

    note = ""
    if rootfs is None and trace is None:
        root = default.stdlib_root()
        trace_path = default.shipped_trace()
        tr = load_trace(trace_path)
        if tr.meta.get("python") != default.python_version():
            trace_path = cache / f"default-{default.python_version().replace(' ', '-')}.trace"
            note = (
                f"the shipped trace is of {tr.meta.get('python')}, this is "
                f"{default.python_version()}: recorded the same programs afresh ({trace_path})"
            )
            if not trace_path.exists():
                if not record_if_needed:
                    raise DemoError(note)
                cache.mkdir(parents=True, exist_ok=True)
                default.record_default(trace_path)
            tr = load_trace(trace_path)
        image, manifest = cached_image(root, cache, exclude=default.EXCLUDE, name="stdlib")
        is_default = True
    else:
        if trace is None:
            raise DemoError("--rootfs needs --trace: a trace recorded against that root")
        trace_path = Path(trace)
        tr = load_trace(trace_path)  # FileNotFoundError / TraceError name the file and line
        if rootfs is None:
            if "root" not in tr.meta:
                raise DemoError(f"{trace}: the trace names no root; give --rootfs")
            rootfs = tr.meta["root"]
        root = Path(rootfs)
        if not root.is_dir():
            raise DemoError(f"--rootfs {rootfs!r} is not a directory")
        image, manifest = cached_image(root, cache, name="rootfs")
        is_default = False
    plan = Plan.compile(tr, manifest)
    if plan.reads == 0:
        example = plan.problems[0] if plan.problems else "-"
        raise DemoError(
            f"no line of {trace_path} names a file of {root} within its size "
            f"({len(plan.problems)} lines skipped, e.g. {example})"
        )
    return Workload(root, Path(trace_path), tr, image, manifest, plan, is_default, note)
