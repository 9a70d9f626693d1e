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
from support import needs_root

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
