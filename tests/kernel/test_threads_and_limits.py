"""Many threads at once, and the vm.max_map_count wall."""

from __future__ import annotations

import errno
import gc
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import oracle
import pytest
from support import data_pages, needs_root

import devanon

PS = devanon.PAGE_SIZE


def test_threads_mapping_and_unmapping_at_once_keep_counts_exact() -> None:
    npages = 64
    with devanon.Anon(npages * PS) as mem:
        anchor = mem.map(0, npages * PS)  # every page keeps >= 1: data must survive
        anchor.view()[:] = bytes(range(256)) * (npages * PS // 256)
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []
        kept: list[devanon.Mapping] = []
        lock = threading.Lock()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            live: list[devanon.Mapping] = []
            try:
                barrier.wait()
                for _ in range(300):
                    if live and rng.random() < 0.5:
                        m = live.pop(rng.randrange(len(live)))
                        if m.length > PS and rng.random() < 0.5:  # cut, then close the rest
                            mem.unmap(m.address + PS, PS)
                        m.close()
                    else:
                        first = rng.randrange(npages)
                        n = rng.randint(1, npages - first)
                        live.append(mem.map(first * PS, n * PS))
                with lock:
                    kept.extend(live)
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        kernel = oracle.maps_counts(mem.fd, PS)
        assert {p: mem.map_count(p * PS) for p in range(npages)} == {
            p: kernel.get(p, 0) for p in range(npages)
        }
        assert bytes(anchor.view()) == bytes(range(256)) * (npages * PS // 256)
        for m in kept:
            m.close()
        anchor.close()
        assert mem.resident_bytes() == 0
        assert oracle.maps_counts(mem.fd, PS) == {}


@needs_root
def test_max_map_count_is_a_clear_error_that_changes_nothing(
    sysctl: Callable[[str, int], None], tmp_path: Path
) -> None:
    image = tmp_path / "page.img"
    image.write_bytes(b"o" * PS)
    npages = 4096
    with devanon.Anon(npages * PS) as mem:
        guest = mem.map(0, npages * PS)
        guest.view()[:] = b"g" * npages * PS
        with open("/proc/self/maps") as f:
            held = sum(1 for _ in f)
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        sysctl("vm.max_map_count", held + 200)  # single-page overlays hit it at ~100
        overlays = []
        hole = npages - 2  # far from the overlays, inside the guest mapping's last VMA
        gc.disable()  # no arena given back between the two walls below
        try:
            with pytest.raises(OSError, match="max_map_count") as info:
                for page in range(0, npages, 2):
                    overlays.append(mem.overlay(guest.address + page * PS, image, 0, PS))
            # munmap of one page inside a mapping must split it: the same wall
            with pytest.raises(OSError, match="max_map_count") as unmap_info:
                mem.unmap(guest.address + hole * PS, PS)
        finally:
            gc.enable()
        assert info.value.errno == unmap_info.value.errno == errno.ENOMEM
        failed = len(overlays) * 2  # the page whose overlay was refused
        assert 0 < len(overlays) < npages // 2
        for page in (failed, hole):
            assert mem.map_count(page * PS) == 1
            assert os.pread(mem.fd, PS, page * PS) == b"g" * PS
            assert oracle.maps_counts(mem.fd, PS).get(page) == 1
        resident = mem.resident_bytes()
        assert resident == (npages - len(overlays)) * PS
        # The wall is shown. Away from it again: at the wall, whatever else this process
        # maps meanwhile (an allocator arena) could make the releases below fail too.
        sysctl("vm.max_map_count", limit)
        for o in overlays:
            o.release()
        guest.close()
        assert mem.resident_bytes() == 0


@needs_root
def test_a_close_refused_at_max_map_count_punches_what_it_dropped(
    sysctl: Callable[[str, int], None],
) -> None:
    mem = devanon.Anon(16 * PS)
    base = mem.map(12 * PS, 4 * PS)
    # Two mappings placed over base's pages 0 and 2, at base's own offsets: one kernel VMA.
    first = mem.map(12 * PS, PS, address=base.address)
    second = mem.map(14 * PS, PS, address=base.address + 2 * PS)
    first.view()[:] = b"z" * PS
    second.view()[:] = b"g" * PS
    # Live views: close() quarantines them, base's page between is munmapped: three calls.
    # The first cuts the VMA (the kernel lets that take the process one past the limit),
    # and the third, an mmap, is then refused.
    views = [first.view(), second.view()]
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    gc.disable()
    try:
        with open("/proc/self/maps") as f:  # every VMA but [vsyscall]: no split is left
            sysctl("vm.max_map_count", sum(1 for line in f if "[vsyscall]" not in line))
        with pytest.raises(OSError, match="max_map_count"):
            mem.close()
    finally:
        sysctl("vm.max_map_count", limit)
        gc.enable()
    try:
        assert not mem.closed
        size = 16 * PS
        kernel = oracle.maps_counts(mem.fd, PS)
        assert {p: mem.map_count(p * PS) for p in range(16)} == {
            p: kernel.get(p, 0) for p in range(16)
        }
        counted = {p for p in range(16) if kernel.get(p)}
        assert data_pages(mem.fd, size, PS) <= counted  # what close() dropped was punched
        again = mem.map(10 * PS, PS)
        again.view()[:] = b"x" * PS
        again.close()
        assert 10 not in data_pages(mem.fd, size, PS)  # and punching goes on
    finally:
        views.clear()
        mem.close()
    assert mem.closed


def test_an_unmap_over_viewed_mappings_refused_at_max_map_count_changes_nothing(
    sysctl: Callable[[str, int], None],
) -> None:
    """Each piece with live views is quarantined by an mmap of its own: the second can
    hit the limit after the first is done. The unmap must be refused before either."""
    mem = devanon.Anon(16 * PS)
    whole = mem.map(0, 16 * PS)
    whole.view()[:] = b"m" * 16 * PS
    first = mem.map(2 * PS, 2 * PS, address=whole.address + 2 * PS)  # one VMA with whole
    second = mem.map(10 * PS, 2 * PS, address=whole.address + 10 * PS)
    views = [first.view(), second.view()]

    def state() -> tuple[object, ...]:
        return (
            oracle.maps_counts(mem.fd, PS),
            [mem.map_count(p * PS) for p in range(16)],
            data_pages(mem.fd, 16 * PS, PS),
            os.pread(mem.fd, 16 * PS, 0),
            first.closed,
            second.closed,
        )

    before = state()
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    gc.disable()
    try:
        with open("/proc/self/maps") as f:  # room for the first quarantine, not the second
            held = sum(1 for line in f if "[vsyscall]" not in line)
        sysctl("vm.max_map_count", held + 1)
        with pytest.raises(OSError, match="max_map_count"):
            mem.unmap(whole.address + 2 * PS, 10 * PS)
    finally:
        sysctl("vm.max_map_count", limit)
        gc.enable()
    try:
        assert state() == before
        assert bytes(views[0][:2]) == b"mm"
        mem.unmap(whole.address + 2 * PS, 10 * PS)  # with room, it goes
        assert bytes(views[0][:2]) == b"\0\0" and first.closed and second.closed
    finally:
        views.clear()
        mem.close()


@pytest.mark.parametrize("room", [2, 3], ids=["refused", "goes-through"])
def test_the_room_an_unmap_needs_is_the_kernels_to_the_mapping(
    sysctl: Callable[[str, int], None], room: int
) -> None:
    """Quarantine, munmap, quarantine, munmap, quarantine inside one kernel mapping: the
    first cuts it on both sides (2 more), each later quarantine cuts one side (1 more; the
    kernel refuses an mmap only once the process holds more than the limit). So with 3
    free the kernel makes them all; with 2 it would refuse the third part way: refused
    before the first, changing nothing."""
    mem = devanon.Anon(64 * PS)
    base = mem.map(0, 64 * PS)
    placed = [mem.map(p * PS, 2 * PS, address=base.address + p * PS) for p in (8, 12, 16)]
    views = [m.view() for m in placed]
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    gc.disable()
    try:
        before = oracle.maps_counts(mem.fd, PS)
        with open("/proc/self/maps") as f:
            held = sum(1 for line in f if "[vsyscall]" not in line)
        sysctl("vm.max_map_count", held + room)
        if room == 2:
            with pytest.raises(OSError, match="max_map_count"):
                mem.unmap(base.address + 8 * PS, 10 * PS)
            assert oracle.maps_counts(mem.fd, PS) == before
            assert not any(m.closed for m in placed)
        else:
            mem.unmap(base.address + 8 * PS, 10 * PS)
            assert all(m.closed for m in placed)
            assert set(oracle.maps_counts(mem.fd, PS)) == {*range(8), *range(18, 64)}
    finally:
        sysctl("vm.max_map_count", limit)
        gc.enable()
        views.clear()
        mem.close()


def test_a_view_dying_mid_unmap_costs_no_room_the_check_did_not_count(
    sysctl: Callable[[str, int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One quarantine covers the pieces of several viewed mappings. If one of them loses
    its last view just then (another thread), its piece is unmapped only after the calls:
    cut out of the quarantine earlier, it would take a mapping the check did not count."""
    from devanon import mapper

    mem = devanon.Anon(64 * PS)
    base = mem.map(0, 64 * PS)
    placed = [mem.map(p * PS, 2 * PS, address=base.address + p * PS) for p in (8, 10, 12, 16)]
    views = [m.view() for m in placed]
    real = mapper.quarantine

    def quarantine_then_a_view_dies(address: int, length: int) -> None:
        real(address, length)
        if views[1] is not None:
            views[1] = None  # the middle mapping's last view

    monkeypatch.setattr(mapper, "quarantine", quarantine_then_a_view_dies)
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    gc.disable()
    try:
        with open("/proc/self/maps") as f:  # calls: quarantine, munmap, quarantine
            held = sum(1 for line in f if "[vsyscall]" not in line)
        sysctl("vm.max_map_count", held + 2)  # what they need, no more
        mem.unmap(base.address + 8 * PS, 10 * PS)
    finally:
        sysctl("vm.max_map_count", limit)
        gc.enable()
    try:
        assert all(m.closed for m in placed)
        assert set(oracle.maps_counts(mem.fd, PS)) == {*range(8), *range(18, 64)}
        base.close()  # with room again, the middle piece (no view needs it) goes too
        middle = placed[1].address
        assert not any(lo < middle + 2 * PS and middle < hi for lo, hi in _ranges())
    finally:
        views.clear()
        mem.close()


def _ranges() -> list[tuple[int, int]]:
    with open("/proc/self/maps") as f:
        return [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f]  # type: ignore[misc]


def test_a_mapping_close_in_two_spans_refused_at_max_map_count_changes_nothing(
    sysctl: Callable[[str, int], None],
) -> None:
    mem = devanon.Anon(32 * PS)
    base = mem.map(0, 32 * PS)
    whole = mem.map(4 * PS, 16 * PS, address=base.address + 4 * PS)  # one VMA with base
    whole.view()[:] = b"w" * 16 * PS
    views = [whole.view()]
    mem.unmap(base.address + 10 * PS, 2 * PS)  # quarantined: whole is two spans now
    # close() quarantines each span, one call each; each splits a VMA it shares with base.

    def state() -> tuple[object, ...]:
        return (
            oracle.maps_counts(mem.fd, PS),
            [mem.map_count(p * PS) for p in range(32)],
            data_pages(mem.fd, 32 * PS, PS),
            whole.closed,
        )

    before = state()
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    gc.disable()
    try:
        with open("/proc/self/maps") as f:
            sysctl("vm.max_map_count", sum(1 for line in f if "[vsyscall]" not in line))
        with pytest.raises(OSError, match="max_map_count"):
            whole.close()
        assert state() == before
    finally:
        sysctl("vm.max_map_count", limit)
        gc.enable()
    try:
        whole.close()
        assert bytes(views[0][:1]) == b"\0"
        kernel = oracle.maps_counts(mem.fd, PS)
        assert kernel == {p: 1 for p in [*range(4), *range(20, 32)]}
        assert [mem.map_count(p * PS) for p in range(32)] == [kernel.get(p, 0) for p in range(32)]
    finally:
        views.clear()
        mem.close()


def test_an_anon_dropped_without_close_gives_its_mappings_back() -> None:
    def forget() -> int:
        mem = devanon.Anon(64 * PS, name="dropped")
        m = mem.map(0, 64 * PS)
        m.view()[:] = b"x" * 64 * PS
        return mem.fd

    forget()
    gc.collect()  # the Anon and its mappings form a cycle
    with open("/proc/self/maps") as f:
        assert not [line for line in f if "/memfd:dropped " in line]
