"""Guests as processes in a fresh memory cgroup: the kernel's memory.stat shows the saving.

Two guests per mode on one small image. In copy mode each guest's memory (shmem) holds its
other memory plus a copy of every page it read; in mmap mode only its other memory, and the
image's page cache (file) is the same in both modes: one copy, shared by both guests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import needs_root

from devanon import cgroups, measure
from devanon.demo.runs import Workload, load_workload, run_curve, run_density
from devanon.guest.fleet import Fleet, FleetConfig
from devanon.guest.plan import Plan
from devanon.image import build_image
from devanon.trace import format_trace, parse_trace
from devanon.ubd import Mode

PS = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
OTHER = 2 * MIB
SLACK = 512 << 10
"""What else a guest may be charged in shmem or file (its COW file's header, say)."""


@pytest.fixture
def small(disk_dir: Path) -> tuple[Path, Path, Path]:
    """A root of 12 files (6 MiB), its image, and a trace reading all of them."""
    root = disk_dir / "root"
    root.mkdir()
    reads = []
    for i in range(12):
        data = os.urandom(PS) * 128 + bytes([i]) * 100  # 512 KiB and a bit
        (root / f"f{i}").write_bytes(data)
        reads.append((f"f{i}", 0, len(data)))
    image = disk_dir / "disk.img"
    build_image(root, image)
    trace = disk_dir / "t.trace"
    trace.write_text(format_trace(reads, {"guest_other_bytes": OTHER}))
    return root, image, trace


@needs_root
def test_memory_stat_shows_one_copy_in_mmap_mode(
    small: tuple[Path, Path, Path], disk_dir: Path
) -> None:
    root, image, trace = small
    plan = Plan.compile(parse_trace(trace.read_text()), build_image(root, image))
    plan.save(disk_dir / "plan.bin")
    disk = plan.distinct_bytes
    assert disk == 12 * 129 * PS
    figures = {}
    for mode in (Mode.COPY, Mode.MMAP):
        with cgroups.fresh(f"devanon-test-{mode.value}") as group:
            assert measure.drop_file_cache(image) == 0
            config = FleetConfig(
                str(image),
                str(disk_dir / "plan.bin"),
                mode,
                64 * MIB,
                str(disk_dir),
                cgroup_procs=str(group.procs_file),
            )
            with Fleet(config) as fleet:
                assert all(fleet.start().booted for _ in range(2))
                assert sorted(group.procs()) == sorted(g.pid for g in fleet.booted)
                figures[mode] = measure.cgroup_sample(group)
        assert not group.path.exists()
    copy, mmap = figures[Mode.COPY], figures[Mode.MMAP]
    for s in (copy, mmap):  # the image's page cache: the pages read, once for both guests
        assert disk <= s.file_bytes <= disk + SLACK
    assert 2 * (OTHER + disk) <= copy.shmem_bytes <= 2 * (OTHER + disk) + SLACK
    assert 2 * OTHER <= mmap.shmem_bytes <= 2 * OTHER + SLACK
    assert copy.total_bytes - mmap.total_bytes >= 2 * disk - SLACK


def workload_of(small: tuple[Path, Path, Path], tmp: Path) -> Workload:
    root, _, trace = small
    return load_workload(str(root), str(trace), tmp)


@needs_root
def test_density_is_found_by_the_oom_killer(small: tuple[Path, Path, Path], disk_dir: Path) -> None:
    """Under a 48 MiB budget more mmap guests fit than copy guests, told by oom_kill."""
    work = workload_of(small, disk_dir / "cache")
    found = {}
    for mode in (Mode.COPY, Mode.MMAP):
        found[mode] = run_density(work, mode, 48 * MIB, 32 * MIB, str(disk_dir), cap=40)
    for d in found.values():
        assert d.measured and d.oom_kills >= 1 and not d.hit_cap
        assert d.started == d.guests + 1  # the one that did not fit
        assert d.last is not None and d.last.total_bytes <= 48 * MIB
    assert found[Mode.MMAP].guests > found[Mode.COPY].guests >= 1


@needs_root
def test_curve_and_cgroup_clean_up(small: tuple[Path, Path, Path], disk_dir: Path) -> None:
    work = workload_of(small, disk_dir / "cache")
    version, parent = cgroups.find_parent()
    before = {p.name for p in parent.iterdir() if p.is_dir()}
    curve = run_curve(work, Mode.MMAP, 3, 32 * MIB, str(disk_dir))
    totals = [s.total_bytes for s in curve.samples]
    assert totals == sorted(totals) and len(totals) == 3
    assert curve.cached_before == 0
    assert {p.name for p in parent.iterdir() if p.is_dir()} == before
    assert version in (1, 2)
