"""Host memory as the kernel sees it: the same four numbers for every mode.

- ``file_bytes``: page cache of files (the disk image), shmem excluded;
- ``shmem_bytes``: shmem (the guests' Anons);
- ``anon_bytes``: anonymous memory (the guest processes' own heaps);
- ``total_bytes``: file + shmem + anon, what ``memory.stat`` charges in pages of data
  (page tables and other kernel memory are reported apart, as ``kernel_bytes``).

With root they come from a fresh memory cgroup's ``memory.stat`` (``devanon.cgroups``).
Without root there is no cgroup to read: the image's page cache comes from ``mincore`` on a
mapping of it, the Anons' from their ``st_blocks``, and the processes' own memory from
``Pss_Anon`` in ``/proc/PID/smaps_rollup``.

Caches are dropped before a run: the image is fsynced and ``POSIX_FADV_DONTNEED`` drops its
clean pages (pages a live process maps survive that, and ``drop_caches`` too: measure one
run at a time). ``mincore`` then says whether it worked; as root ``drop_caches`` is the
fallback.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from devanon import _libc
from devanon.anon import PAGE_SIZE
from devanon.cgroups import Cgroup, parse_flat_keyed


@dataclass(slots=True, frozen=True)
class MemorySample:
    """Host memory charged for what a measurement ran, in bytes."""

    file_bytes: int
    shmem_bytes: int
    anon_bytes: int
    kernel_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.file_bytes + self.shmem_bytes + self.anon_bytes

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def sample_from_stat(stat: dict[str, int], version: int, usage: int | None = None) -> MemorySample:
    """A sample from ``memory.stat`` (v1 ``total_cache/total_rss/total_shmem``, v2
    ``file/anon/shmem``); ``usage`` (the cgroup's charge) gives ``kernel_bytes``."""
    if version == 1:
        cache, anon, shmem = stat["total_cache"], stat["total_rss"], stat["total_shmem"]
    else:
        cache, anon, shmem = stat["file"], stat["anon"], stat["shmem"]
    sample = MemorySample(cache - shmem, shmem, anon)
    if usage is not None:
        kernel = stat["kernel"] if version == 2 and "kernel" in stat else usage - cache - anon
        sample = MemorySample(sample.file_bytes, shmem, anon, max(0, kernel))
    return sample


def cgroup_sample(group: Cgroup) -> MemorySample:
    """What ``group`` is charged now."""
    return sample_from_stat(group.stat(), group.version, group.usage())


def cached_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the file held in the page cache (``mincore`` on a mapping of it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        address = _libc.mmap(0, size, _libc.PROT_READ, _libc.MAP_SHARED, fd, 0)
        try:
            vec = _libc.mincore(address, size, PAGE_SIZE)
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec) * PAGE_SIZE


def drop_file_cache(path: str | os.PathLike[str]) -> int:
    """Drop the file's page cache; returns the bytes still cached (0 unless mapped).

    As root, ``drop_caches`` (page cache only) is the fallback if pages remain.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = cached_bytes(path)
    if left and os.geteuid() == 0:
        drop_caches()
        left = cached_bytes(path)
    return left


def drop_caches() -> None:
    """``sync; echo 1 > /proc/sys/vm/drop_caches`` (root): every clean, unmapped page."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("1\n")


def pss_anon(pid: int) -> int:
    """The process's proportional share of anonymous memory (``smaps_rollup``), in bytes."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            fields = parse_flat_keyed(f.read().replace(":", " ").replace(" kB", ""))
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return fields.get("Pss_Anon", fields.get("Anonymous", 0)) * 1024


def sample_without_cgroup(
    image: str | os.PathLike[str], anon_resident: int, pids: list[int]
) -> MemorySample:
    """The no-root figures: the image's cached pages, the Anons' ``st_blocks`` (summed by
    the caller), and the processes' ``Pss_Anon``."""
    return MemorySample(cached_bytes(image), anon_resident, sum(pss_anon(p) for p in pids))
