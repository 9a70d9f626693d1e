"""punch_hole(): sys_punch for any file, the call the RFC was waiting for.

Today it is ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``; ``madvise(MADV_REMOVE)``
through a temporary shared mapping is the fallback (in current kernels it ends in the same
fallocate, so it rarely helps, but it is what older code used). Where neither works (ramfs,
some FUSE and network filesystems) the error names the file and its filesystem.

Linux serializes fallocate on one shmem file; like gVisor's pgalloc, big ranges are punched
in batches of at most 128 MiB so that other work on the file is not held up for long.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from devanon import _checks, _libc
from devanon.counts import MapCounts, PageRange

PUNCH_BATCH = 128 << 20
"""The most one fallocate call punches."""

_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY)


@dataclass(slots=True, frozen=True)
class PunchResult:
    """What the kernel freed: ``st_blocks`` (512-byte units) before and after."""

    file: str
    offset: int
    length: int
    blocks_before: int
    blocks_after: int

    @property
    def freed_bytes(self) -> int:
        return (self.blocks_before - self.blocks_after) * 512


def filesystem_of(fd: int) -> str:
    """The filesystem type holding an open file, from /proc/self/mountinfo ("?" if unknown)."""
    dev = os.fstat(fd).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if fields[2] == want:
                    return fields[fields.index("-") + 1]
    except OSError:
        pass
    return "?"


def punch_pages(
    fd: int, ranges: list[tuple[int, int]], page_size: int, *, name: str = ""
) -> tuple[int, int]:
    """Punch page ranges ``[first, last)``, touching neighbours joined into one range each;
    returns the calls made and the bytes punched."""
    if len(ranges) == 1:  # the common case: one page or run fell to zero
        first, last = ranges[0]
        length = (last - first) * page_size
        return punch_one(fd, first * page_size, length, name), length
    calls = freed = 0
    joined: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if joined and joined[-1][1] == first:
            joined[-1] = (joined[-1][0], last)
        else:
            joined.append((first, last))
    for first, last in joined:
        calls += punch_range(fd, first * page_size, (last - first) * page_size, name=name)
        freed += (last - first) * page_size
    return calls, freed


SWEEP_STEP = 1024
"""Pages a sweep (``uncounted``) looks at in one step: at most 512 punches (every other
page uncounted), a few milliseconds."""


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The byte ranges ``[data, hole)`` within ``[start, end)`` that hold data, by
    SEEK_DATA and SEEK_HOLE (the kernel's view of holes)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def uncounted(
    fd: int, counts: MapCounts, page_size: int, start: int = 0
) -> Iterator[tuple[int, list[PageRange]]]:
    """Walk the data of ``fd`` from page ``start``, ``SWEEP_STEP`` pages at most a step:
    for each step, the page after it and the page ranges in it whose count is 0 (data
    that no unmap will ever free: what a sweep punches). It costs what the data costs,
    however the counts are cut up."""
    for data, hole in data_extents(fd, start * page_size, counts.npages * page_size):
        first, stop = data // page_size, -(-hole // page_size)
        while first < stop:
            last = min(stop, first + SWEEP_STEP)
            yield last, counts.zero_ranges(first, last)
            first = last


def punch_one(fd: int, offset: int, length: int, name: str = "") -> int:
    """``punch_range`` in one ``fallocate`` where it can (a range up to ``PUNCH_BATCH`` on
    a filesystem that punches): the hot path of an unmap, where each Python call costs a
    measurable share. Returns the calls made (a failed first try is not counted)."""
    if length <= PUNCH_BATCH and not _libc.fallocate_status(fd, _libc.PUNCH_HOLE, offset, length):
        return 1
    return punch_range(fd, offset, length, name)


def punch_range(fd: int, offset: int, length: int, name: str = "") -> int:
    """Punch ``[offset, offset+length)`` of an open file; returns the number of calls made.

    No argument checks: the caller (Anon, punch_hole) has made them. Raises OSError with
    EOPNOTSUPP and the filesystem's name where the file cannot have holes.
    """
    end, calls = offset + length, 0
    while True:  # the common case (up to PUNCH_BATCH) goes round once
        step = min(PUNCH_BATCH, end - offset)
        try:
            _libc.fallocate(fd, _libc.PUNCH_HOLE, offset, step)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise
            _remove_through_mapping(fd, offset, step, name, e)
        calls += 1
        offset += step
        if offset >= end:
            return calls


def _remove_through_mapping(fd: int, offset: int, length: int, name: str, cause: OSError) -> None:
    """The fallback: MADV_REMOVE on a temporary shared mapping of the range."""
    try:
        address = _libc.mmap(
            0, length, _libc.PROT_READ | _libc.PROT_WRITE, _libc.MAP_SHARED, fd, offset
        )
    except OSError as e:
        address = 0
        if e.errno == errno.EACCES:  # the filesystem is not the reason: the descriptor is
            raise OSError(
                errno.EOPNOTSUPP,
                f"cannot punch a hole in {name or f'fd {fd}'}: fallocate(FALLOC_FL_PUNCH_HOLE) "
                "is not supported there, and madvise(MADV_REMOVE) needs the file open for "
                "reading and writing",
            ) from cause
    try:
        if address:
            _libc.madvise(address, length, _libc.MADV_REMOVE)
            return
    except OSError:
        pass
    finally:
        if address:
            _libc.munmap(address, length)
    fs = filesystem_of(fd)
    raise OSError(
        errno.EOPNOTSUPP,
        f"cannot punch a hole in {name or f'fd {fd}'}: its filesystem ({fs}) supports neither "
        "fallocate(FALLOC_FL_PUNCH_HOLE) nor madvise(MADV_REMOVE)",
    ) from cause


def punch_hole(file: int | str | os.PathLike[str], offset: int, length: int) -> PunchResult:
    """Free ``[offset, offset+length)`` of any file, keeping its size: sys_punch.

    ``file`` is an open file descriptor (opened for writing; for reading too where the
    filesystem needs the MADV_REMOVE fallback) or a path. Partial blocks at the
    edges are zeroed, whole blocks freed. Returns what ``st_blocks`` said before and after.
    """
    offset, length = _checks.integer("offset", offset), _checks.integer("length", length)
    if offset < 0:
        raise ValueError(f"offset must not be negative, not {offset}")
    if length <= 0:
        raise ValueError(f"length must be positive, not {length}")
    try:  # read too: the MADV_REMOVE fallback maps the file
        fd, name, own = _checks.opened("file", file, os.O_RDWR)
    except PermissionError:
        fd, name, own = _checks.opened("file", file, os.O_WRONLY)
    try:
        st, size = os.fstat(fd), _checks.file_size(fd)
        if offset >= size:
            raise ValueError(f"offset {offset} is past the end of {name} (size {size})")
        length = min(length, size - offset)  # past the end is nothing (KEEP_SIZE)
        punch_range(fd, offset, length, name=name)
        return PunchResult(name, offset, length, st.st_blocks, os.fstat(fd).st_blocks)
    finally:
        if own:
            os.close(fd)
