"""Anon, the device: a file whose pages are map-counted and given back at count zero.

An Anon is a memfd (or a file on tmpfs, hugetlbfs or a disk filesystem) plus the books the
2004 patch kept in the kernel: how many times each page is mapped (``MapCounts``). The
address-space half (which mapping owns which piece, overlays, views) is ``Mapper``; this
module keeps the counts and frees pages:

- A page is freed with ``fallocate(PUNCH_HOLE)``, never ``MADV_DONTNEED``, which does
  nothing to a shared file page (Firecracker #6167). QEMU's ``ram_block_discard_range``
  does the same for fd-backed guest RAM.
- Counts are raised before the pages are mapped and lowered after they are unmapped, so a
  mapping placed over another mapping of the same pages never lets them touch zero.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import weakref
from dataclasses import dataclass

from devanon import _checks, _libc
from devanon import forking as _forking
from devanon.counts import MapCounts, PageRange
from devanon.mapper import MEMFD_LABEL_MAX, PAGE_SIZE, Mapper, Mapping, Overlay
from devanon.punch import filesystem_of, punch_one, punch_pages, punch_range, uncounted

__all__ = ["HUGE_PAGE_SIZE", "PAGE_SIZE", "Anon", "AnonStats", "Mapping", "Overlay"]

HUGE_PAGE_SIZE = 2 << 20

_HUGETLBFS = "hugetlbfs"


@dataclass(slots=True, frozen=True)
class AnonStats:
    """A snapshot of one Anon. Byte figures are multiples of the page size."""

    size: int
    page_size: int
    mapped_bytes: int
    """Bytes with a map count above zero."""
    resident_bytes: int
    """Bytes the kernel holds for the file (``st_blocks``)."""
    freed_bytes: int
    """Bytes punched so far (counted once per punch, whether or not they held data)."""
    punch_calls: int
    mappings: int
    overlays: int
    count_runs: int
    count_bytes: int
    """Memory the map counts themselves take."""


class Anon(Mapper):
    """Memory that acts like anonymous memory, except for not being anonymous.

    A zero-filled file of ``size`` bytes: a memfd (close-on-exec, sealed against growing
    and shrinking) or, with ``path``, a new file there (tmpfs, hugetlbfs, or a disk
    filesystem: memory larger than RAM), removed again by ``close()``. Every page is
    counted each time it is mapped; a page whose count falls to zero is punched out of the
    file before the call that dropped it returns. ``hugepages=True`` uses 2 MiB pages.
    """

    def __init__(
        self,
        size: int,
        *,
        path: str | os.PathLike[str] | None = None,
        hugepages: bool = False,
        name: str = "devanon",
    ) -> None:
        size = _checks.integer("size", size)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {name!r}")
        if len(name.encode(errors="surrogateescape")) > MEMFD_LABEL_MAX or "\0" in name:
            raise ValueError(
                f"name {name!r} is not a memfd name: at most {MEMFD_LABEL_MAX} bytes, no NUL"
            )
        hugepages = _checks.flag("hugepages", hugepages)
        self.path: str | None = None
        if path is not None:
            target = _checks.path_or_fd("path", path)
            if isinstance(target, int):
                raise TypeError(f"path must be a path, not the int {target!r}")
            self.path = target
        self.name = name
        self.hugepages = hugepages
        if not 0 < size < 1 << 63:
            raise ValueError(f"size must be positive and below 2**63 (off_t), not {size}")
        self.page_size = HUGE_PAGE_SIZE if hugepages else PAGE_SIZE
        _checks.aligned("size", size, self.page_size)
        if hugepages and path is None and _checks.free_hugepages() < 1:
            raise OSError(
                errno.ENOMEM,
                "no free 2 MiB huge pages for a hugepages=True Anon: raise "
                "/proc/sys/vm/nr_hugepages",
            )
        self.fd = self._open_backing(size)
        self.size = size
        self._writable_fd = True
        self._init_books()
        self._counts = MapCounts(size // self.page_size)
        self._freed_bytes = 0
        self._punch_calls = 0
        self._fork = _forking.ForkState()
        self._chores = self._fork.children  # (the one list, changed in place)
        self._closer = weakref.finalize(self, os.close, self.fd)
        _forking.track(self)

    def map_count(self, offset: int) -> int:
        """How many times the page holding ``offset`` is mapped."""
        offset = _checks.integer("offset", offset)
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset:#x} is outside the Anon (size {self.size:#x})")
        with self._lock:
            self._check_open()
            self._before_op()
            return self._counts.count(offset // self.page_size)

    def resident_bytes(self) -> int:
        """What the kernel holds for the backing file, from ``st_blocks``."""
        with self._lock:
            self._check_open()
            self._before_op()
            return os.fstat(self.fd).st_blocks * 512

    def stats(self) -> AnonStats:
        """Counts, mapped / resident / freed bytes, punch calls, live mappings."""
        with self._lock:
            self._check_open()
            self._before_op()
            return AnonStats(
                size=self.size,
                page_size=self.page_size,
                mapped_bytes=self._counts.mapped_pages() * self.page_size,
                resident_bytes=os.fstat(self.fd).st_blocks * 512,
                freed_bytes=self._freed_bytes,
                punch_calls=self._punch_calls,
                mappings=self._nmappings,
                overlays=len(self._overlays),
                count_runs=self._counts.nruns(),
                count_bytes=self._counts.nbytes(),
            )

    def close(self) -> None:
        """Unmap every mapping and overlay, close the file (and remove it, if it has a path).

        Closing twice is allowed. Views still alive keep their ranges quarantined. Nothing
        is punched: the kernel frees the file with its last descriptor and mapping.
        """
        self._close(untrack=True)

    def __del__(self) -> None:
        """An Anon dropped without ``close()`` gives its mappings back, as ``mmap.mmap``
        does (its mappings and it form a cycle: only the garbage collector gets here)."""
        with contextlib.suppress(Exception):  # also at interpreter exit, half torn down
            if not self.closed:
                # No untrack: the collector may run inside a fork hook's walk of the tracked
                # set, and the weak set lets go of a dead object by itself.
                self._close(untrack=False)

    def _close(self, untrack: bool) -> None:
        with self._lock:
            if self.closed:
                return
            self._closing = True
            try:
                self._unmap_all()
            except BaseException:
                # Pieces unmapped before the failure lost their counts unpunched: punch
                # whatever data lies at count 0, and go on punching from now on.
                self._closing = False
                if self._closer.alive:  # (the collector may have closed the file first)
                    self._sweep()
                raise
            self._fork.close()
            self._closer()
            self.fd = -1
            if self.path is not None and not self._fork.is_child:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            if untrack:
                _forking.untrack(self)

    def __enter__(self) -> Anon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path or "memfd"
        state = "closed" if self.closed else f"fd {self.fd}"
        return f"<devanon.Anon {self.name!r} {self.size:#x} bytes on {where}, {state}>"

    # -- backing file ------------------------------------------------------------------

    def _open_backing(self, size: int) -> int:
        if self.path is None:
            flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            if self.hugepages:
                flags |= os.MFD_HUGETLB | os.MFD_HUGE_2MB
            fd = os.memfd_create(self.name, flags)
            try:
                _resize(fd, size, self.name)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
            except BaseException:
                os.close(fd)
                raise
            return fd
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fs = filesystem_of(fd)
            if self.hugepages and fs != _HUGETLBFS:
                raise ValueError(
                    f"hugepages=True needs a path on hugetlbfs; {self.path} is on {fs}"
                )
            if fs == _HUGETLBFS:
                self.hugepages = True
                self.page_size = os.fstat(fd).st_blksize
                _checks.aligned("size", size, self.page_size)
            _resize(fd, size, self.path)
            # Probe once that the filesystem can punch, so the error comes now and not at
            # the first unmap (punching a hole in a hole changes nothing).
            punch_range(fd, 0, self.page_size, name=self.path)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        return fd

    # -- the counts (Mapper's hooks; the lock is held) ------------------------------------

    _closing = False

    def _gain(self, ranges: list[PageRange]) -> None:
        if self._fork.is_child:
            self._refuse_in_child()
        for first, last in ranges:
            self._counts.add(first, last)

    def _map_counted(self, first: int, last: int, prot: int, offset: int) -> int:
        if self._fork.is_child:
            self._refuse_in_child()
        self._counts.change_ints(first, last, 1)
        length = (last - first) * self.page_size
        address: int = _libc.mmap_status(0, length, prot, _libc.MAP_SHARED, self.fd, offset)
        if address != _libc.MAP_FAILED:
            return address
        err = _libc.mmap_error(0, length, prot, _libc.MAP_SHARED, self.fd, offset)
        self._counts.remove(first, last)  # as _give_back
        raise self._mmap_error(err)

    def _refuse_in_child(self) -> None:
        raise ValueError(
            f"{self!r} belongs to the process that forked this one: a child may use and unmap "
            "the mappings it inherited, but not map pages (its parent could not count them and "
            "would free them under it); processes that share memory use devanon.broker"
        )

    def _lose_one(self, first: int, last: int) -> None:
        zeros = self._counts.change_ints(first, last, -1)
        if zeros and not self._closing and not self._fork.is_child:
            ps = self.page_size
            for a, b in zeros:  # sorted, and never touching: runs of one range
                self._punch_calls += punch_one(self.fd, a * ps, (b - a) * ps, self.name)
                self._freed_bytes += (b - a) * ps

    def _give_back(self, ranges: list[PageRange]) -> None:
        """No punch: a page whose count goes back to 0 had 0 before this map, so it holds
        no data (the file starts empty, and a page is punched whenever it falls to 0)."""
        for first, last in ranges:
            self._counts.remove(first, last)

    def _lose(self, ranges: list[PageRange]) -> None:
        zeros: list[PageRange] = []
        for first, last in ranges:
            zeros += self._counts.remove(first, last)
        if not self._closing:
            self._punch(zeros)

    def _before_op(self) -> None:
        """Drop the counts of forked children that have exited (see ``devanon.forking``)."""
        if self._fork.children and self._fork.reap(self._counts):
            self._sweep()

    def _punch(self, zeros: list[PageRange]) -> None:
        """Punch page ranges that fell to zero, coalescing neighbours into one call each."""
        if not zeros or self._fork.is_child:
            return
        calls, freed = punch_pages(self.fd, zeros, self.page_size, name=self.name)
        self._punch_calls += calls
        self._freed_bytes += freed

    def _sweep(self) -> None:
        """Punch every byte of data that lies in pages with no count (after a child left)."""
        for _, zeros in uncounted(self.fd, self._counts, self.page_size):
            self._punch(zeros)

    # -- fork (devanon.forking holds the lock from before fork() to after) ------------------

    def _forked(self, lifeline: int) -> None:
        """In the parent: pin the inherited pages for the child until it is gone."""
        pins = self._inherited_pages()
        for first, last in pins:
            self._counts.add(first, last)
        self._fork.children.append(_forking.Child(lifeline, pins))

    def _fork_child(self, pinned: bool) -> bool:
        """In the child: forget the mappings the child did not inherit (never punching);
        all of them if the parent could not pin the inherited ones (no lifeline pipe)."""
        self._fork.close()  # the parent's other children are not ours to wait for
        self._fork.is_child = True
        self._lose(self._drop_uninherited(everything=not pinned))
        return pinned


def _resize(fd: int, size: int, label: str) -> None:
    """ftruncate, refused with the size and the file named (EFBIG past what it can hold)."""
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        raise OSError(e.errno, f"cannot make {label} {size} bytes long: {e.strerror}") from None
