"""Anon, the device: a file whose pages are map-counted and given back at count zero.

An Anon is a memfd (or a file on tmpfs, hugetlbfs or a disk filesystem) plus the books that
the 2004 patch kept in the kernel: for each page, how many times it is mapped
(``MapCounts``), and for each piece of this process's address space that the Anon owns,
which ``Mapping`` it belongs to and whether an ``Overlay`` covers it (the segment list).

Facts the code relies on:

- Mappings are always ``MAP_SHARED``. A ``MAP_PRIVATE`` mapping of the memfd would keep
  private copies that no punch frees (Cloud Hypervisor #8246).
- A page is freed with ``fallocate(PUNCH_HOLE)``, never ``MADV_DONTNEED``, which does
  nothing to a shared file page (Firecracker #6167).
- ``mmap(MAP_FIXED)`` replaces whatever was at the address. devanon only ever places a
  mapping or overlay over address space it already owns, so it never clobbers foreign
  memory, and it updates its books only after the kernel said yes.
- Counts are raised before they are lowered, so a mapping placed over another mapping of
  the same pages never lets them touch zero in between.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import weakref
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from devanon import _checks, _libc
from devanon import forking as _forking
from devanon.counts import MapCounts, PageRange
from devanon.punch import filesystem_of, punch_range
from devanon.views import ViewTracker

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
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


def _coalesce(ranges: list[PageRange]) -> list[PageRange]:
    """Sorted ranges with touching neighbours joined: one punch call each."""
    out: list[PageRange] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class _Segment:
    """A piece of address space the Anon owns: part of ``owner``, maybe under an overlay."""

    __slots__ = ("overlay", "owner", "start", "stop")

    def __init__(self, start: int, stop: int, owner: Mapping, overlay: Overlay | None) -> None:
        self.start = start
        self.stop = stop
        self.owner = owner
        self.overlay = overlay


class Mapping:
    """One ``Anon.map()``: ``length`` bytes of the Anon from ``offset``, at ``address``.

    Pieces of it may be unmapped (``Anon.unmap``) or covered by overlays; ``close()`` unmaps
    what is left. Use as a context manager.
    """

    __slots__ = (
        "__weakref__",
        "_pieces",
        "_views",
        "address",
        "anon",
        "inherit",
        "length",
        "offset",
        "writable",
    )

    def __init__(
        self, anon: Anon, address: int, offset: int, length: int, writable: bool, inherit: bool
    ) -> None:
        self.anon = anon
        self.address = address
        self.offset = offset
        self.length = length
        self.writable = writable
        self.inherit = inherit
        self._pieces = 0
        self._views: ViewTracker | None = None  # made by the first view()

    @property
    def closed(self) -> bool:
        """True once no piece of the mapping is left."""
        return self._pieces == 0

    def _has_views(self) -> bool:
        return self._views is not None and self._views.live > 0

    def _retire(self, address: int, length: int) -> bool:
        """Quarantine a piece if views of this mapping are alive (see ``devanon.views``)."""
        return self._views is not None and self._views.retire(address, length)

    def offset_of(self, address: int) -> int:
        """The Anon offset that ``address`` (inside this mapping) shows."""
        return self.offset + (address - self.address)

    def view(self) -> memoryview:
        """A memoryview of the whole mapping (read-only unless the mapping is writable).

        The view stays safe after the mapping is unmapped: see ``devanon.views``.
        """
        return self.anon._view(self)

    def close(self) -> None:
        """Unmap whatever of the mapping is still mapped."""
        self.anon._close_mapping(self)

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed and not self.anon.closed:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._pieces} pieces"
        return (
            f"<devanon.Mapping {self.length:#x} bytes of {self.anon.name!r} from offset "
            f"{self.offset:#x} at {self.address:#x}, {state}>"
        )


class Overlay:
    """Another file's pages mapped privately over memory an Anon maps (ubd-mmap's primitive).

    ``release()`` maps the Anon back in place. Use as a context manager.
    """

    __slots__ = (
        "__weakref__",
        "_pieces",
        "address",
        "anon",
        "file",
        "file_offset",
        "length",
        "writable",
    )

    def __init__(
        self, anon: Anon, address: int, file: str, file_offset: int, length: int, writable: bool
    ) -> None:
        self.anon = anon
        self.address = address
        self.file = file
        self.file_offset = file_offset
        self.length = length
        self.writable = writable
        self._pieces = 0

    @property
    def released(self) -> bool:
        """True once no piece of the overlay is left (released, unmapped or mapped over)."""
        return self._pieces == 0

    def release(self) -> None:
        """Map the Anon back under the overlay; those pages regain their count."""
        self.anon._release_overlay(self)

    def __enter__(self) -> Overlay:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.released and not self.anon.closed:
            self.release()

    def __repr__(self) -> str:
        return (
            f"<devanon.Overlay {self.length:#x} bytes of {self.file} from {self.file_offset:#x} "
            f"at {self.address:#x}{', released' if self.released else ''}>"
        )


class Anon:
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
        self.path: str | None = None
        if path is not None:
            target = _checks.path_or_fd("path", path)
            if isinstance(target, int):
                raise TypeError(f"path must be a path, not the int {target!r}")
            self.path = target
        self.name = name
        self.hugepages = bool(hugepages)
        if size <= 0:
            raise ValueError(f"size must be positive, not {size}")
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
        self._lock = threading.RLock()
        self._counts = MapCounts(size // self.page_size)
        self._segments: list[_Segment] = []
        self._starts: list[int] = []
        self._nmappings = 0
        self._overlays: set[Overlay] = set()
        self._freed_bytes = 0
        self._punch_calls = 0
        self._fork = _forking.ForkState()
        self._closer = weakref.finalize(self, os.close, self.fd)
        _forking.track(self)

    # -- public API --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def map(
        self,
        offset: int,
        length: int,
        *,
        address: int | None = None,
        writable: bool = True,
        inherit: bool = False,
    ) -> Mapping:
        """Map ``[offset, offset+length)``; every page in it gains one count.

        ``address`` places the mapping with MAP_FIXED, only over memory this Anon already
        maps; what was there counts as unmapped. ``inherit=True`` lets forked children
        keep the mapping (they are counted: see ``devanon.forking``); by default a child
        does not get it (MADV_DONTFORK).
        """
        ps = self.page_size
        if (
            type(offset) is not int
            or type(length) is not int
            or offset < 0
            or length <= 0
            or (offset | length) % ps
            or offset + length > self.size
        ):  # the common case needs none of _check_range's messages
            offset, length = self._check_range(offset, length)
        if address is not None:
            address = _checks.aligned("address", address, ps, positive=True)
        if writable and not self._writable_fd:
            raise ValueError(f"cannot map {self.name!r} writable: its descriptor is read-only")
        prot = _libc.PROT_READ | (_libc.PROT_WRITE if writable else 0)
        with self._lock:
            if self.fd < 0:
                self._check_open()
            if self._fork.children:
                self._reap()
            if address is None:
                address = self._mmap(0, length, prot, _libc.MAP_SHARED, offset, inherit)
                mapping = Mapping(self, address, offset, length, bool(writable), bool(inherit))
                self._counts.add(offset // ps, (offset + length) // ps)
                self._insert(_Segment(address, address + length, mapping, None))
                self._nmappings += 1
                return mapping
            else:
                self._check_owned(address, length)
                replaced = self._pieces(address, address + length)
                for seg in replaced:
                    if seg.owner._has_views():
                        raise BufferError(
                            f"cannot map over {seg.start:#x}: {seg.owner!r} has live views"
                        )
                self._mmap(
                    address, length, prot, _libc.MAP_SHARED | _libc.MAP_FIXED, offset, inherit
                )
            mapping = Mapping(self, address, offset, length, bool(writable), bool(inherit))
            self._counts.add(offset // ps, (offset + length) // ps)
            zeros = self._forget(replaced)
            self._insert(_Segment(address, address + length, mapping, None))
            self._nmappings += 1
            self._punch(zeros)
            return mapping

    def unmap(self, address: int, length: int) -> None:
        """munmap semantics over this Anon's mappings: may cut one in two or span several.

        Every byte of the range must belong to this Anon's mappings (or overlays on them).
        Pages whose count falls to zero are punched before this returns.
        """
        address = _checks.aligned("address", address, self.page_size, positive=True)
        length = _checks.aligned("length", length, self.page_size, positive=True)
        with self._lock:
            self._check_open()
            self._reap()
            self._check_owned(address, length)
            self._unmap_owned(address, address + length)

    def overlay(
        self,
        address: int,
        file: int | str | os.PathLike[str],
        file_offset: int,
        length: int,
        *,
        writable: bool = False,
    ) -> Overlay:
        """Map ``file``'s pages (MAP_FIXED | MAP_PRIVATE) over memory this Anon maps.

        The Anon pages underneath lose that count, exactly as munmap would (and are
        punched if it falls to zero). ``writable=True`` makes writes private copies;
        the file itself is never written.
        """
        address = _checks.aligned("address", address, self.page_size, positive=True)
        length = _checks.aligned("length", length, self.page_size, positive=True)
        file_offset = _checks.aligned("file_offset", file_offset, PAGE_SIZE)
        target = _checks.path_or_fd("file", file)
        fd = target if isinstance(target, int) else os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        label = f"fd {fd}" if isinstance(target, int) else str(target)
        try:
            file_size = os.fstat(fd).st_size
            if file_offset + length > -(-file_size // PAGE_SIZE) * PAGE_SIZE:
                raise ValueError(
                    f"overlay of {label} [{file_offset:#x}, {file_offset + length:#x}) reaches "
                    f"past its end ({file_size:#x}): those pages would fault with SIGBUS"
                )
            prot = _libc.PROT_READ | (_libc.PROT_WRITE if writable else 0)
            with self._lock:
                self._check_open()
                self._reap()
                self._check_owned(address, length)
                pieces = self._pieces(address, address + length)
                try:
                    _libc.mmap(
                        address, length, prot, _libc.MAP_PRIVATE | _libc.MAP_FIXED, fd, file_offset
                    )
                except OSError as e:
                    raise _checks.max_map_count_hint(e) from None
                overlay = Overlay(self, address, label, file_offset, length, bool(writable))
                zeros: list[PageRange] = []
                for seg in pieces:
                    self._advise_fork(seg.start, seg.stop - seg.start, seg.owner.inherit)
                    if seg.overlay is None:
                        zeros += self._counts.remove(*self._seg_pages(seg))
                    else:
                        seg.overlay._pieces -= 1
                        self._discard_overlay(seg.overlay)
                    seg.overlay = overlay
                    overlay._pieces += 1
                self._overlays.add(overlay)
                self._punch(zeros)
                return overlay
        finally:
            if not isinstance(target, int):
                os.close(fd)

    def map_count(self, offset: int) -> int:
        """How many times the page holding ``offset`` is mapped."""
        offset = _checks.integer("offset", offset)
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset:#x} is outside the Anon (size {self.size:#x})")
        with self._lock:
            self._check_open()
            self._reap()
            return self._counts.count(offset // self.page_size)

    def resident_bytes(self) -> int:
        """What the kernel holds for the backing file, from ``st_blocks``."""
        with self._lock:
            self._check_open()
            self._reap()
            return os.fstat(self.fd).st_blocks * 512

    def stats(self) -> AnonStats:
        """Counts, mapped / resident / freed bytes, punch calls, live mappings."""
        with self._lock:
            self._check_open()
            self._reap()
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

        Closing twice is allowed. Views still alive keep their ranges quarantined.
        """
        with self._lock:
            if self.closed:
                return
            while self._segments:
                first = self._segments[0]
                stop = first.stop
                for seg in self._segments[1:]:
                    if seg.start != stop:
                        break
                    stop = seg.stop
                self._unmap_owned(first.start, stop, punch=False)
            self._fork.close()
            self._closer()
            self.fd = -1
            if self.path is not None and not self._fork.is_child:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
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
                os.ftruncate(fd, size)
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
            os.ftruncate(fd, size)
            # Probe once that the filesystem can punch, so the error comes now and not at
            # the first unmap (punching a hole in a hole changes nothing).
            punch_range(fd, 0, self.page_size, name=self.path)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        return fd

    # -- books (the lock is held) ------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{self!r} is closed")

    def _check_range(self, offset: int, length: int) -> tuple[int, int]:
        offset = _checks.aligned("offset", offset, self.page_size)
        length = _checks.aligned("length", length, self.page_size, positive=True)
        if offset + length > self.size:
            raise ValueError(
                f"range [{offset:#x}, {offset + length:#x}) reaches past the end of the Anon "
                f"(size {self.size:#x})"
            )
        return offset, length

    def _page_range(self, offset: int, length: int) -> PageRange:
        return offset // self.page_size, (offset + length) // self.page_size

    def _seg_pages(self, seg: _Segment) -> PageRange:
        return self._page_range(seg.owner.offset_of(seg.start), seg.stop - seg.start)

    def _check_owned(self, address: int, length: int) -> None:
        """ValueError unless every byte of the range is in this Anon's segments."""
        stop = address + length
        k = bisect_right(self._starts, address) - 1
        pos = address
        while pos < stop:
            if k < 0 or k >= len(self._segments) or self._segments[k].stop <= pos:
                raise ValueError(
                    f"address range [{address:#x}, {stop:#x}) is not all mapped by "
                    f"{self!r}: nothing of it at {pos:#x}"
                )
            if self._segments[k].start > pos:
                raise ValueError(
                    f"address range [{address:#x}, {stop:#x}) is not all mapped by "
                    f"{self!r}: nothing of it at {pos:#x}"
                )
            pos = self._segments[k].stop
            k += 1

    def _cut(self, address: int) -> None:
        """Split the segment holding ``address`` so that one starts there."""
        k = bisect_right(self._starts, address) - 1
        if k < 0:
            return
        seg = self._segments[k]
        if not seg.start < address < seg.stop:
            return
        tail = _Segment(address, seg.stop, seg.owner, seg.overlay)
        seg.stop = address
        self._segments.insert(k + 1, tail)
        self._starts.insert(k + 1, address)
        seg.owner._pieces += 1
        if seg.overlay is not None:
            seg.overlay._pieces += 1

    def _pieces(self, start: int, stop: int) -> list[_Segment]:
        """The segments exactly covering ``[start, stop)`` (owned), cut at its edges."""
        self._cut(start)
        self._cut(stop)
        return self._segments[bisect_left(self._starts, start) : bisect_left(self._starts, stop)]

    def _insert(self, seg: _Segment) -> None:
        k = bisect_left(self._starts, seg.start)
        self._segments.insert(k, seg)
        self._starts.insert(k, seg.start)
        seg.owner._pieces += 1

    def _forget(self, pieces: list[_Segment]) -> list[PageRange]:
        """Drop contiguous ``pieces`` from the books; returns the page ranges now at zero."""
        if not pieces:
            return []
        k = bisect_left(self._starts, pieces[0].start)
        del self._segments[k : k + len(pieces)]
        del self._starts[k : k + len(pieces)]
        zeros: list[PageRange] = []
        for seg in pieces:
            if seg.overlay is None:
                zeros += self._counts.remove(*self._seg_pages(seg))
            else:
                seg.overlay._pieces -= 1
                self._discard_overlay(seg.overlay)
            seg.owner._pieces -= 1
            if seg.owner._pieces == 0:
                self._nmappings -= 1
        return zeros

    def _discard_overlay(self, overlay: Overlay) -> None:
        if overlay._pieces == 0:
            self._overlays.discard(overlay)

    def _unmap_owned(self, start: int, stop: int, *, punch: bool = True) -> None:
        """Unmap owned ``[start, stop)``: quarantine pieces with live views, munmap the rest."""
        pieces = self._pieces(start, stop)
        done: list[_Segment] = []
        try:
            run: list[_Segment] = []
            for seg in pieces:
                try:
                    retired = seg.owner._retire(seg.start, seg.stop - seg.start)
                except OSError as e:
                    raise _checks.max_map_count_hint(e) from None
                if retired:
                    self._munmap_run(run, done)
                    done.append(seg)
                else:
                    run.append(seg)
            self._munmap_run(run, done)
        finally:
            zeros = self._forget(sorted(done, key=lambda s: s.start)) if done else []
            if punch:
                self._punch(zeros)

    def _munmap_run(self, run: list[_Segment], done: list[_Segment]) -> None:
        if not run:
            return
        try:
            _libc.munmap(run[0].start, run[-1].stop - run[0].start)
        except OSError as e:
            raise _checks.max_map_count_hint(e) from None
        done.extend(run)
        run.clear()

    def _mmap(
        self, address: int, length: int, prot: int, flags: int, offset: int, inherit: bool
    ) -> int:
        try:
            address = _libc.mmap(address, length, prot, flags, self.fd, offset)
        except OSError as e:
            if self.hugepages:
                raise _checks.hugepage_hint(e) from None
            raise _checks.max_map_count_hint(e) from None
        self._advise_fork(address, length, inherit)
        return address

    def _advise_fork(self, address: int, length: int, inherit: bool) -> None:
        """MADV_DONTFORK unless ``inherit``: see ``devanon.forking``. Failure can't leave a
        half-made mapping, so the (new) mapping is then left to the caller's books."""
        if not inherit:
            _libc.madvise(address, length, _libc.MADV_DONTFORK)

    def _punch(self, zeros: list[PageRange]) -> None:
        """Punch page ranges that fell to zero, coalescing neighbours into one call each."""
        if not zeros or self._fork.is_child:
            return
        ps = self.page_size
        if len(zeros) > 1:
            zeros = _coalesce(zeros)
        for a, b in zeros:
            self._punch_calls += punch_range(self.fd, a * ps, (b - a) * ps, name=self.name)
            self._freed_bytes += (b - a) * ps

    def _reap(self) -> None:
        """Drop the counts of forked children that have exited (see ``devanon.forking``)."""
        if self._fork.children and self._fork.reap(self._counts):
            self._sweep()

    def _sweep(self) -> None:
        """Punch every byte of data that lies in pages with no count (after a child left)."""
        ps = self.page_size
        for a, b in self._counts.zero_ranges():
            pos, end = a * ps, b * ps
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        return
                    raise
                if data >= end:
                    break
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
                data -= data % ps
                hole += -hole % ps
                self._punch([(data // ps, hole // ps)])
                pos = hole

    # -- called by Mapping and Overlay ---------------------------------------------------

    def _view(self, mapping: Mapping) -> memoryview:
        with self._lock:
            self._check_open()
            covered = sum(
                seg.stop - seg.start
                for seg in self._segments[
                    bisect_left(self._starts, mapping.address) : bisect_left(
                        self._starts, mapping.address + mapping.length
                    )
                ]
                if seg.owner is mapping
            )
            if covered != mapping.length:
                raise ValueError(f"{mapping!r} is not wholly mapped any more: no view of it")
            if mapping._views is None:
                mapping._views = ViewTracker()
            return mapping._views.view(
                mapping.address, mapping.length, readonly=not mapping.writable
            )

    def _close_mapping(self, mapping: Mapping) -> None:
        with self._lock:
            if self.fd < 0:
                self._check_open()
            if mapping._pieces == 0:
                raise ValueError(f"{mapping!r} is already closed")
            if self._fork.children:
                self._reap()
            if mapping._pieces == 1 and not mapping._has_views():
                # The common case, kept short: one whole segment, no overlay, no view.
                k = bisect_left(self._starts, mapping.address)
                seg = self._segments[k]
                if (
                    seg.owner is mapping
                    and seg.overlay is None
                    and seg.stop - seg.start == mapping.length
                ):
                    self._munmap_run([seg], [])
                    del self._segments[k]
                    del self._starts[k]
                    mapping._pieces = 0
                    self._nmappings -= 1
                    ps = self.page_size
                    self._punch(
                        self._counts.remove(
                            mapping.offset // ps, (mapping.offset + mapping.length) // ps
                        )
                    )
                    return
            lo = bisect_left(self._starts, mapping.address)
            hi = bisect_left(self._starts, mapping.address + mapping.length)
            spans: list[list[int]] = []
            for seg in self._segments[lo:hi]:
                if seg.owner is not mapping:
                    continue
                if spans and spans[-1][1] == seg.start:
                    spans[-1][1] = seg.stop
                else:
                    spans.append([seg.start, seg.stop])
            for start, stop in spans:
                self._unmap_owned(start, stop)

    def _release_overlay(self, overlay: Overlay) -> None:
        with self._lock:
            self._check_open()
            if overlay.released:
                raise ValueError(f"{overlay!r} is already released")
            self._reap()
            lo = bisect_left(self._starts, overlay.address)
            hi = bisect_left(self._starts, overlay.address + overlay.length)
            for seg in self._segments[lo:hi]:
                if seg.overlay is not overlay:
                    continue
                owner = seg.owner
                prot = _libc.PROT_READ | (_libc.PROT_WRITE if owner.writable else 0)
                self._mmap(
                    seg.start,
                    seg.stop - seg.start,
                    prot,
                    _libc.MAP_SHARED | _libc.MAP_FIXED,
                    owner.offset_of(seg.start),
                    owner.inherit,
                )
                self._counts.add(*self._seg_pages(seg))
                seg.overlay = None
                overlay._pieces -= 1
            self._discard_overlay(overlay)

    # -- called by devanon.forking around fork(); the lock is held from before to after ---

    def _fork_parent(self) -> list[PageRange]:
        """In the parent: pin the inherited pages for the child; returns the pins."""
        pins = [self._seg_pages(s) for s in self._segments if s.owner.inherit and not s.overlay]
        for first, last in pins:
            self._counts.add(first, last)
        return pins

    def _fork_child(self) -> None:
        """In the child: forget the mappings that MADV_DONTFORK kept from it.

        Their views, copied with the heap, would point at nothing: quarantine them.
        """
        for seg in [s for s in self._segments if not s.owner.inherit]:
            seg.owner._retire(seg.start, seg.stop - seg.start)
            self._forget([seg])
