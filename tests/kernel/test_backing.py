"""Backing files other than a memfd: huge pages, disk filesystems, ones that can't punch."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import oracle
import pytest
from support import needs_root

import devanon
from devanon._checks import free_hugepages

PS = devanon.PAGE_SIZE
HUGE = 2 << 20


@needs_root
def test_hugepages_are_counted_and_punched_at_2mib(sysctl: Callable[[str, int], None]) -> None:
    sysctl("vm.nr_hugepages", int(Path("/proc/sys/vm/nr_hugepages").read_text()) + 8)
    if free_hugepages() < 8:
        pytest.skip("the kernel could not find 8 free 2 MiB pages")
    with devanon.Anon(8 * HUGE, hugepages=True) as mem:
        assert mem.page_size == HUGE
        with pytest.raises(ValueError, match="multiple of the page size"):
            mem.map(PS, HUGE)
        a = mem.map(0, 4 * HUGE)
        a.view()[0] = 1
        a.view()[3 * HUGE] = 3
        b = mem.map(0, HUGE)
        assert mem.resident_bytes() == 2 * HUGE
        assert oracle.maps_counts(mem.fd, HUGE) == {0: 2, 1: 1, 2: 1, 3: 1}
        a.close()
        assert mem.resident_bytes() == HUGE  # page 0 is still mapped by b
        assert b.view()[0] == 1
        b.close()
        assert mem.resident_bytes() == 0


@needs_root
def test_an_empty_huge_page_pool_names_nr_hugepages(sysctl: Callable[[str, int], None]) -> None:
    sysctl("vm.nr_hugepages", 0)
    if free_hugepages() > 0:
        pytest.skip("huge pages are still free (surplus or another user)")
    with pytest.raises(OSError, match="nr_hugepages") as info:
        devanon.Anon(HUGE, hugepages=True)
    assert info.value.errno == errno.ENOMEM


@needs_root
def test_hugetlbfs_path(sysctl: Callable[[str, int], None], mount: Callable[[str], Path]) -> None:
    sysctl("vm.nr_hugepages", int(Path("/proc/sys/vm/nr_hugepages").read_text()) + 4)
    if free_hugepages() < 4:
        pytest.skip("the kernel could not find 4 free 2 MiB pages")
    path = mount("hugetlbfs") / "guest-ram"
    with devanon.Anon(4 * HUGE, path=path) as mem:
        assert mem.hugepages and mem.page_size == HUGE
        m = mem.map(0, 2 * HUGE)
        m.view()[HUGE] = 7
        assert mem.resident_bytes() == HUGE
        m.close()
        assert mem.resident_bytes() == 0
    assert not path.exists()


def test_disk_file_backing_frees_blocks_and_is_removed(disk_dir: Path) -> None:
    path = disk_dir / "swapfs"
    with devanon.Anon(1 << 30, path=path) as mem:  # sparse: 1 GiB costs no blocks
        assert path.exists() and mem.resident_bytes() == 0
        m = mem.map(0, 16 * PS)
        m.view()[:] = b"D" * 16 * PS
        os.fsync(mem.fd)
        assert oracle.data_pages(mem.fd, mem.size, PS) == set(range(16))
        assert mem.resident_bytes() >= 16 * PS
        keep = mem.map(8 * PS, 8 * PS)
        m.close()
        assert oracle.data_pages(mem.fd, mem.size, PS) == set(range(8, 16))
        assert bytes(keep.view()) == b"D" * 8 * PS
        keep.close()
        assert mem.resident_bytes() == 0
    assert not path.exists()


def test_an_existing_path_is_not_clobbered(disk_dir: Path) -> None:
    path = disk_dir / "precious"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        devanon.Anon(PS, path=path)
    assert path.read_bytes() == b"keep me"


def test_a_size_past_what_the_filesystem_holds_is_named_and_leaves_no_file(
    disk_dir: Path,
) -> None:
    path = disk_dir / "too-big"
    with pytest.raises(OSError, match=f"cannot make {path} {1 << 50} bytes long"):
        devanon.Anon(1 << 50, path=path)  # ext4 holds 16 TiB files at most
    assert not path.exists()


def test_hugepages_on_a_disk_path_is_refused(disk_dir: Path) -> None:
    with pytest.raises(ValueError, match="hugetlbfs"):
        devanon.Anon(HUGE, path=disk_dir / "x", hugepages=True)
    assert not (disk_dir / "x").exists()


@needs_root
def test_a_filesystem_that_cannot_punch_is_a_clear_error(mount: Callable[[str], Path]) -> None:
    ramfs = mount("ramfs")
    with pytest.raises(OSError, match="ramfs") as info:
        devanon.Anon(4 * PS, path=ramfs / "mem")
    assert info.value.errno == errno.EOPNOTSUPP
    assert not (ramfs / "mem").exists()
    plain = ramfs / "file"
    plain.write_bytes(b"r" * 2 * PS)
    with pytest.raises(OSError, match="ramfs"):
        devanon.punch_hole(plain, 0, PS)
    assert plain.read_bytes() == b"r" * 2 * PS
