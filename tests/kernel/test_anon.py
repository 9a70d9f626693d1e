"""Anon against the kernel's own view: st_blocks, SEEK_DATA, /proc/self/maps."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import oracle
import pytest
from support import interrupt_after_next_mmap, unmap_every_mapping_of

import devanon

PS = devanon.PAGE_SIZE


def maps_ranges() -> list[tuple[int, int]]:
    """Every address range in /proc/self/maps."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def is_mapped(address: int) -> bool:
    return any(lo <= address < hi for lo, hi in maps_ranges())


def assert_counts_match_kernel(mem: devanon.Anon) -> None:
    kernel = oracle.maps_counts(mem.fd, mem.page_size)
    npages = mem.size // mem.page_size
    ours = {p: mem.map_count(p * mem.page_size) for p in range(npages)}
    assert {p: c for p, c in ours.items() if c} == {p: c for p, c in kernel.items() if c}


def test_write_then_unmap_frees_exactly_the_written_pages() -> None:
    with devanon.Anon(64 * PS) as mem:
        m = mem.map(0, 32 * PS)
        view = m.view()
        for page in (0, 1, 7, 31):
            view[page * PS] = page + 1
        del view
        assert oracle.data_pages(mem.fd, mem.size, PS) == {0, 1, 7, 31}
        assert mem.resident_bytes() == 4 * PS == os.fstat(mem.fd).st_blocks * 512
        assert_counts_match_kernel(mem)
        m.close()
        assert mem.resident_bytes() == 0
        assert oracle.data_pages(mem.fd, mem.size, PS) == set()
        assert mem.stats().mappings == 0
        again = mem.map(0, 32 * PS)
        assert bytes(again.view()[: 8 * PS]) == bytes(8 * PS)


def test_a_page_mapped_twice_survives_one_unmap() -> None:
    with devanon.Anon(16 * PS) as mem:
        a, b = mem.map(0, 8 * PS), mem.map(4 * PS, 8 * PS)
        a.view()[4 * PS : 8 * PS] = b"x" * 4 * PS
        a.view()[0] = 1
        assert [mem.map_count(p * PS) for p in range(13)] == [1] * 4 + [2] * 4 + [1] * 4 + [0]
        assert_counts_match_kernel(mem)
        a.close()
        assert oracle.data_pages(mem.fd, mem.size, PS) == {4, 5, 6, 7}
        assert bytes(b.view()[: 4 * PS]) == b"x" * 4 * PS
        b.close()
        assert mem.resident_bytes() == 0


def test_unmap_cuts_a_mapping_in_two_and_spans_several() -> None:
    with devanon.Anon(32 * PS) as mem:
        a = mem.map(0, 8 * PS)
        b = mem.map(8 * PS, 8 * PS, address=None)
        for m in (a, b):
            m.view()[:] = b"\x01" * m.length
        mem.unmap(a.address + 2 * PS, 2 * PS)  # a hole in the middle of a
        assert [mem.map_count(p * PS) for p in range(8)] == [1, 1, 0, 0, 1, 1, 1, 1]
        assert not is_mapped(a.address + 2 * PS) and is_mapped(a.address + 4 * PS)
        assert oracle.data_pages(mem.fd, mem.size, PS) == set(range(16)) - {2, 3}
        assert_counts_match_kernel(mem)
        if b.address == a.address + a.length:  # adjacent: one unmap spans both
            mem.unmap(a.address + 6 * PS, 4 * PS)
            assert oracle.data_pages(mem.fd, mem.size, PS) == {0, 1, 4, 5} | set(range(10, 16))
        a.close()
        b.close()
        assert mem.resident_bytes() == 0
        assert a.closed and b.closed


def test_map_over_own_mapping_counts_as_unmap_of_what_was_there() -> None:
    with devanon.Anon(32 * PS) as mem:
        a = mem.map(0, 8 * PS)
        a.view()[:] = b"a" * 8 * PS
        b = mem.map(16 * PS, 4 * PS, address=a.address + 2 * PS)
        assert [mem.map_count(p * PS) for p in (0, 2, 5, 6, 16, 19)] == [1, 0, 0, 1, 1, 1]
        assert oracle.data_pages(mem.fd, mem.size, PS) == {0, 1, 6, 7}
        assert_counts_match_kernel(mem)
        # the same pages placed over themselves never fall to zero
        c = mem.map(0, 2 * PS, address=a.address)
        assert bytes(c.view()) == b"a" * 2 * PS
        for m in (a, b, c):
            if not m.closed:
                m.close()
        assert mem.resident_bytes() == 0


def test_map_refuses_foreign_memory_and_changes_nothing() -> None:
    with devanon.Anon(8 * PS) as mem, devanon.Anon(8 * PS) as other:
        theirs = other.map(0, 4 * PS)
        theirs.view()[0] = 9
        mine = mem.map(0, 4 * PS)
        for address in (theirs.address, mine.address + 2 * PS):  # not ours / runs past ours
            with pytest.raises(ValueError, match=f"{address:#x}|not all mapped"):
                mem.map(0, 4 * PS, address=address)
        assert theirs.view()[0] == 9
        assert other.map_count(0) == 1 and mem.map_count(0) == 1
        assert_counts_match_kernel(mem)
        assert_counts_match_kernel(other)


def test_overlay_punches_the_pages_under_it_and_release_maps_zeros_back(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * (8 * PS // 256))
    with devanon.Anon(16 * PS) as mem:
        guest = mem.map(0, 16 * PS)
        guest.view()[:] = b"g" * 16 * PS
        ov = mem.overlay(guest.address + 4 * PS, image, 0, 8 * PS)
        assert bytes(guest.view()[4 * PS : 12 * PS]) == image.read_bytes()
        assert [mem.map_count(p * PS) for p in (3, 4, 11, 12)] == [1, 0, 0, 1]
        assert oracle.data_pages(mem.fd, mem.size, PS) == set(range(4)) | set(range(12, 16))
        assert_counts_match_kernel(mem)
        ov.release()
        assert ov.released
        assert bytes(guest.view()[4 * PS : 12 * PS]) == bytes(8 * PS)
        assert mem.map_count(4 * PS) == 1
        assert_counts_match_kernel(mem)
        with pytest.raises(ValueError, match="already released"):
            ov.release()
        guest.close()
        assert mem.resident_bytes() == 0


def test_writable_overlay_writes_private_copies_never_the_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"d" * 2 * PS)
    with devanon.Anon(4 * PS) as mem:
        guest = mem.map(0, 4 * PS)
        with mem.overlay(guest.address, image, 0, 2 * PS, writable=True):
            guest.view()[0] = ord("w")
            assert guest.view()[0] == ord("w")
        assert image.read_bytes() == b"d" * 2 * PS
        assert guest.view()[0] == 0  # the overlay is gone: the Anon page (a hole) is back
        guest.close()


def test_overlay_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    image.write_bytes(b"s" * PS)
    with devanon.Anon(4 * PS) as mem:
        guest = mem.map(0, 4 * PS)
        with pytest.raises(ValueError, match="past its end"):
            mem.overlay(guest.address, image, 0, 2 * PS)
        assert mem.map_count(PS) == 1
        guest.close()


def test_views_work_with_numpy_and_respect_read_only() -> None:
    with devanon.Anon(4 * PS) as mem:
        m = mem.map(0, 4 * PS)
        arr = np.frombuffer(m.view(), dtype=np.uint32)
        arr[:] = np.arange(arr.size, dtype=np.uint32)
        ro = mem.map(0, 4 * PS, writable=False)
        ro_view = ro.view()
        assert ro_view.readonly
        assert np.frombuffer(ro_view, dtype=np.uint32)[1000] == 1000
        with pytest.raises(TypeError):
            ro_view[0] = 1
        del arr, ro_view
        m.close()
        ro.close()


def test_stale_view_reads_zeros_and_never_reaches_a_new_mapping() -> None:
    with devanon.Anon(8 * PS) as mem:
        old = mem.map(0, 4 * PS)
        stale = old.view()
        stale[:4] = b"old!"
        address = old.address
        old.close()
        assert mem.resident_bytes() == 0  # punched although a view is alive
        assert bytes(stale[:4]) == bytes(4)  # quarantined: zeros, not a crash
        stale[0] = 0xFF  # lands in scratch memory
        new = mem.map(0, 4 * PS)
        assert new.address != address  # the range stays reserved while the view lives
        assert os.pread(mem.fd, 1, 0) == b"\0" and mem.resident_bytes() == 0  # not the 0xFF
        assert oracle.maps_counts(mem.fd, PS).get(0) == 1
        del stale
        gc.collect()
        assert not is_mapped(address)  # the last view died: the range went back
        new.close()


def test_map_over_a_mapping_with_live_views_is_refused() -> None:
    with devanon.Anon(8 * PS) as mem:
        m = mem.map(0, 4 * PS)
        view = m.view()
        with pytest.raises(BufferError, match="live views"):
            mem.map(4 * PS, 4 * PS, address=m.address)
        assert mem.map_count(0) == 1 and mem.map_count(4 * PS) == 0
        del view
        mem.map(4 * PS, 4 * PS, address=m.address).close()


def test_a_read_only_overlay_under_live_writable_views_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "page.img"
    image.write_bytes(b"o" * PS)
    with devanon.Anon(4 * PS) as mem:
        m = mem.map(0, 4 * PS)
        m.view()[:] = b"g" * 4 * PS
        view = m.view()
        with pytest.raises(BufferError, match="writable views"):
            mem.overlay(m.address + PS, image, 0, PS)  # a write through view would SIGSEGV
        assert oracle.maps_counts(mem.fd, PS) == {0: 1, 1: 1, 2: 1, 3: 1}
        assert bytes(view[PS : PS + 2]) == b"gg"
        mem.overlay(m.address + PS, image, 0, PS, writable=True).release()  # writes: copies
        with mem.overlay(m.address + PS, image, 0, PS, under_writable_views=True):
            assert bytes(view[PS : PS + 2]) == b"oo"  # the caller's promise: only reads
        del view
        with mem.overlay(m.address, image, 0, PS):
            overlaid = m.view()
            assert overlaid.readonly  # a view made while it lies there cannot write
            assert bytes(overlaid[:2]) == b"oo"
            del overlaid
        assert not m.view().readonly
        m.close()


def test_view_of_a_partly_unmapped_mapping_is_refused() -> None:
    with devanon.Anon(8 * PS) as mem:
        m = mem.map(0, 4 * PS)
        mem.unmap(m.address, PS)
        with pytest.raises(ValueError, match="not wholly mapped"):
            m.view()
        m.close()


def test_close_unmaps_everything_and_is_idempotent() -> None:
    mem = devanon.Anon(8 * PS)
    m = mem.map(0, 8 * PS)
    m.view()[0] = 1
    inode = os.fstat(mem.fd).st_ino
    mem.close()
    mem.close()
    assert mem.closed and m.closed
    with open("/proc/self/maps") as f:
        assert not re.search(rf"\s{inode}\s", f.read())
    for call in (lambda: mem.map(0, PS), mem.resident_bytes, mem.stats, lambda: mem.map_count(0)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_stats_report_the_kernel_resident_figure() -> None:
    with devanon.Anon(16 * PS) as mem:
        m = mem.map(0, 8 * PS)
        m.view()[: 3 * PS] = b"z" * 3 * PS
        st = mem.stats()
        assert st.mapped_bytes == 8 * PS and st.resident_bytes == 3 * PS
        assert st.mappings == 1 and st.overlays == 0 and st.count_runs == 2
        m.close()
        st = mem.stats()
        assert st.freed_bytes == 8 * PS and st.punch_calls == 1 and st.resident_bytes == 0


def test_memfd_is_sealed_and_close_on_exec() -> None:
    import fcntl

    with devanon.Anon(4 * PS) as mem:
        seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SHRINK
        assert not os.get_inheritable(mem.fd)
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 8 * PS)


def test_a_terabyte_anon_costs_nothing_until_used() -> None:
    with devanon.Anon(1 << 40) as mem:
        st = mem.stats()
        assert st.count_bytes < 1 << 10 and st.resident_bytes == 0
        m = mem.map((1 << 40) - 4 * PS, 4 * PS)
        m.view()[-1] = 1
        assert mem.resident_bytes() == PS
        m.close()
        assert mem.resident_bytes() == 0


def test_an_interrupt_just_after_mmap_keeps_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mapping exists but its address is lost: its count must stay, or closing the
    other mapping would punch a page that is still mapped."""
    with devanon.Anon(4 * PS) as anon:
        keep = anon.map(0, PS)
        keep.view()[:5] = b"hello"
        interrupt_after_next_mmap(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            anon.map(0, PS)
        assert anon.map_count(0) == 2 == oracle.maps_counts(anon.fd, PS)[0]
        keep.close()
        assert oracle.resident_bytes(anon.fd) == PS
        st = os.fstat(anon.fd)
    unmap_every_mapping_of(st)  # the lost mapping: tidy up


def test_an_interrupt_just_after_a_placed_mmap_keeps_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``map(address=...)``: the new mapping is in place when the interrupt comes; its
    count must stay, or pages it covers are punched under it."""
    with devanon.Anon(16 * PS) as anon:
        base = anon.map(0, 16 * PS)
        keep = anon.map(8 * PS, 2 * PS)
        keep.view()[:4] = b"kkkk"
        interrupt_after_next_mmap(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            anon.map(8 * PS, 2 * PS, address=base.address)
        kernel = oracle.maps_counts(anon.fd, PS)
        assert all(anon.map_count(p * PS) >= kernel.get(p, 0) for p in range(16))
        keep.close()
        assert os.pread(anon.fd, 4, 8 * PS) == b"kkkk"  # still mapped at base: not punched
        st = os.fstat(anon.fd)
    unmap_every_mapping_of(st)


def test_a_stale_view_read_at_exit_reads_zeros(tmp_path: Path) -> None:
    """An atexit handler registered before devanon's finalizers runs after them: the
    quarantine under a stale view must still be there."""
    script = tmp_path / "late.py"
    script.write_text(
        "import atexit, devanon\n"
        "late = {}\n"
        "atexit.register(lambda: print(bytes(late['view'][:4])))\n"
        "anon = devanon.Anon(4 * devanon.PAGE_SIZE)\n"
        "m = anon.map(0, devanon.PAGE_SIZE)\n"
        "late['view'] = m.view()\n"
        "late['view'][:4] = b'abcd'\n"
        "m.close()\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"b'\\x00\\x00\\x00\\x00'\n"


def test_a_view_that_dies_while_its_range_is_quarantined_leaves_nothing_reserved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last view can die inside ``retire`` (a garbage collection in the same thread,
    just as the quarantine is mapped): the quarantine must go with it."""
    from devanon import _libc

    anon = devanon.Anon(4 * PS)
    m = anon.map(0, 2 * PS)
    views = [m.view()]
    real_mmap = _libc.mmap

    def mmap_then_the_view_dies(*args: int) -> int:
        monkeypatch.setattr(_libc, "mmap", real_mmap)
        address = real_mmap(*args)
        views.clear()  # the last reference: its finalizer runs now, in this call
        return address

    monkeypatch.setattr(_libc, "mmap", mmap_then_the_view_dies)
    start = m.address
    m.close()
    assert not views
    assert not any(a < start + 2 * PS and start < b for a, b in maps_ranges())
    anon.close()


def test_an_overlay_of_another_anons_file_is_refused(tmp_path: Path) -> None:
    """A private mapping of another Anon's file would go uncounted there: its pages could
    be punched under the overlay. A disk-backed one is refused by its path too."""
    with devanon.Anon(4 * PS) as mem, devanon.Anon(4 * PS) as other:
        m, o = mem.map(0, PS), other.map(0, PS)
        o.view()[:4] = b"OOOO"
        with pytest.raises(ValueError, match=r"the file of <devanon\.Anon"):
            mem.overlay(m.address, other.fd, 0, PS)
        assert oracle.maps_counts(other.fd, PS) == {0: 1}
    with devanon.Anon(4 * PS) as mem, devanon.Anon(4 * PS, path=tmp_path / "disk"):
        m = mem.map(0, PS)
        with pytest.raises(ValueError, match="the file of"):
            mem.overlay(m.address, tmp_path / "disk", 0, PS)
