"""Mapper: the address-space half of an Anon, shared by the device and the broker's client.

A Mapper keeps, for each piece of this process's address space that it owns, which
``Mapping`` it belongs to and whether an ``Overlay`` covers it (the segment list). It makes
the mmap/munmap calls, and tells its subclass which page ranges gained or lost a count:

- ``_gain(ranges)`` comes *before* the call that maps the pages, so a count is never
  missing while a page is mapped (the broker's other clients may unmap it meanwhile). On
  the hot path, ``_map_counted`` does both: the broker's client sends its request, makes
  the mmap while the daemon counts, and waits for the yes before the mapping is handed
  out, so no caller can touch a page before its count is held;
- ``_lose(ranges)`` comes *after* the call that unmapped them (or laid an overlay over
  them), so a page is never punched while still mapped here.

``Anon`` keeps the counts in this process and punches; ``broker.SharedAnon`` sends them to
the daemon, which counts for every process.

Facts the code relies on:

- Mappings are always ``MAP_SHARED``. A ``MAP_PRIVATE`` mapping of the memfd would keep
  private copies that no punch frees (Cloud Hypervisor #8246).
- ``mmap(MAP_FIXED)`` replaces whatever was at the address. A Mapper only ever places a
  mapping or overlay over address space it already owns, so it never clobbers foreign
  memory, and it updates its books only after the kernel said yes.
- A failed ``mmap(MAP_FIXED)`` or ``munmap`` (ENOMEM at ``vm.max_map_count``) leaves the old
  mappings in place (checked by the tests on this kernel).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Sized
from typing import TYPE_CHECKING

from devanon import _checks, _libc
from devanon.counts import PageRange
from devanon.views import ViewTracker, quarantine

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_mappers: weakref.WeakSet[Mapper] = weakref.WeakSet()
"""Every Anon and SharedAnon of this process: ``overlay`` takes none of their files."""
MEMFD_LABEL_MAX = 249
"""Bytes of a memfd's name the kernel takes (NAME_MAX less its "memfd:"): more is EINVAL."""
_PROT_RW = _libc.PROT_READ | _libc.PROT_WRITE


class _Segment:
    """A piece of address space the Mapper owns: part of ``_owner``, maybe under an overlay.

    A ``Mapping`` is its own first piece (one object fewer on the hot path of ``map``);
    ``_cut`` makes the others (``_Piece``). ``_counted`` is False for a piece whose count
    someone else holds (a forked child's inherited piece of a shared object: the parent
    pinned it). ``_forkmark`` is True once MADV_DONTFORK was applied to the piece (see
    ``_prepare_fork``).
    """

    __slots__ = ("_counted", "_forkmark", "_overlay", "_start", "_stop")

    _start: int
    _stop: int
    _overlay: Overlay | None
    _counted: bool
    _forkmark: bool

    if TYPE_CHECKING:  # (a slot of _Piece, a property of Mapping: never made as a _Segment)

        @property
        def _owner(self) -> Mapping:
            """The mapping this piece belongs to."""


class _Piece(_Segment):
    """A piece of a mapping other than the one it began as (see ``_Segment``)."""

    __slots__ = ("_owner",)

    _owner: Mapping

    def __init__(
        self, start: int, stop: int, owner: Mapping, overlay: Overlay | None, counted: bool
    ) -> None:
        self._start = start
        self._stop = stop
        self._owner = owner
        self._overlay = overlay
        self._counted = counted
        self._forkmark = False


class Mapping(_Segment):
    """One ``map()``: ``length`` bytes of the object from ``offset``, at ``address``.

    Pieces of it may be unmapped (``unmap``) or covered by overlays; ``close()`` unmaps what
    is left. Use as a context manager.
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
        self, anon: Mapper, address: int, offset: int, length: int, writable: bool, inherit: bool
    ) -> None:
        self.anon = anon
        self.address = address
        self.offset = offset
        self.length = length
        self.writable = writable
        self.inherit = inherit
        self._pieces = 1
        """How many pieces of it the books hold (see ``_Segment``): 0 once closed."""
        self._views: ViewTracker | None = None  # made by the first view()
        self._start = address  # its own first piece, whole and counted
        self._stop = address + length
        self._overlay = None
        self._counted = True
        self._forkmark = False

    @property
    def _owner(self) -> Mapping:
        return self

    @property
    def closed(self) -> bool:
        """True once no piece of the mapping is left."""
        return self._pieces == 0

    def offset_of(self, address: int) -> int:
        """The object offset that ``address`` (inside this mapping) shows."""
        return self.offset + (address - self.address)

    def view(self) -> memoryview:
        """A memoryview of the whole mapping (read-only unless the mapping is writable, and
        while a read-only overlay lies on part of it: a write there would fault).

        The view stays safe after the mapping is unmapped: see ``devanon.views``.
        """
        return self.anon._view(self)

    def close(self) -> None:
        """Unmap whatever of the mapping is still mapped."""
        self.anon._close_mapping(self)

    def _has_views(self) -> bool:
        return self._views is not None and self._views.live > 0

    def _has_writable_views(self) -> bool:
        return self._views is not None and self._views.writers > 0

    def _retire(self, address: int, length: int) -> bool:
        """Quarantine a piece if views of this mapping are alive (see ``devanon.views``)."""
        return self._views is not None and self._views.retire(address, length)

    def _hold(self, address: int, length: int) -> bool:
        """Keep a piece quarantined already if views of this mapping are alive."""
        return self._views is not None and self._views.hold(address, length)

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
    """Another file's pages mapped privately over memory a Mapper maps (ubd-mmap's primitive).

    ``release()`` maps the object back in place. Use as a context manager.
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
        self, anon: Mapper, address: int, file: str, file_offset: int, length: int, writable: bool
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
        """Map the object back under the overlay; those pages regain their count.

        One mmap per piece: refused at vm.max_map_count (OSError) it may stop part way;
        the pieces released stay released and counted, and calling again finishes."""
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


class Mapper(ABC):
    """Maps, unmaps and overlays one file's pages; subclasses keep the counts.

    Subclasses set ``fd``, ``size``, ``page_size``, ``name``, ``hugepages``,
    ``_writable_fd`` (``fd < 0`` once closed) and ``_chores``, call ``_init_books()``, and
    implement ``_gain``, ``_lose``, ``_map_counted`` and ``_before_op`` (``_lose_one`` if
    they can do one range faster).
    """

    fd: int
    size: int
    page_size: int
    name: str
    hugepages: bool
    _writable_fd: bool
    _chores: Sized
    """Empty while ``_before_op`` has nothing to do: the hot paths of map and close then
    skip the call (each Python call there costs a measurable share of a 4 KiB map). A
    subclass whose check is not a container keeps it non-empty."""

    def _init_books(self) -> None:
        st = os.fstat(self.fd)
        self._file_id = (st.st_dev, st.st_ino)
        """The backing file, as a mapping of it shows in /proc/PID/maps."""
        _mappers.add(self)
        self._lock = threading.RLock()
        self._segments: list[_Segment] = []
        self._starts: list[int] = []
        self._nmappings = 0
        self._overlays: set[Overlay] = set()
        self._unreleased: list[tuple[int, int]] = []
        """Quarantined ranges no view needs, whose munmap the limit refused: tried again
        at each unmap (a reserved range of zero memory, never anyone's data)."""

    # -- what subclasses provide -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the object is closed (its descriptor is gone)."""
        return self.fd < 0

    @abstractmethod
    def _gain(self, ranges: list[PageRange]) -> None:
        """Pages about to be mapped: each range gains one count."""

    @abstractmethod
    def _lose(self, ranges: list[PageRange]) -> None:
        """Pages just unmapped: each range loses one count (and is freed at zero)."""

    @abstractmethod
    def _map_counted(self, first: int, last: int, prot: int, offset: int) -> int:
        """Gain a count on pages ``[first, last)`` and mmap them (from byte ``offset``,
        MAP_SHARED, anywhere); returns the address (the hot path of ``map``).

        An OSError from the mmap gives the count back. Anything else (an interrupt just as
        the mapping was made) keeps it: a leaked count never frees a page under a mapping.
        """

    def _lose_one(self, first: int, last: int) -> None:
        """``_lose`` of one range (subclasses may make it shorter: it is the hot path)."""
        self._lose([(first, last)])

    def _give_back(self, ranges: list[PageRange]) -> None:
        """Counts ``_gain`` took for a mapping the kernel refused: ``_lose`` them (a
        subclass that knows the pages held no data may skip the punch)."""
        self._lose(ranges)

    @abstractmethod
    def _before_op(self) -> None:
        """Called with the lock held at the start of every operation (while ``_chores``)."""

    def _begin(self) -> None:
        """The start of every operation (lock held): ``_in_step``, then ``_before_op``.
        The hot paths call it only if one of the two has something to do."""
        if len(self._starts) != len(self._segments):
            self._in_step()
        if self._chores:
            self._before_op()

    def _in_step(self) -> None:
        """Put the books back in step: an interrupt (a signal handler's exception) between
        the updates of the two lists leaves them apart (each update changes a length by
        one, so it shows). The segments say what is mapped."""
        self._starts[:] = [seg._start for seg in self._segments]

    # -- public API --------------------------------------------------------------------

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

        ``address`` places the mapping with MAP_FIXED, only over memory this object already
        maps; what was there counts as unmapped. ``inherit=True`` lets forked children
        keep the mapping (they are counted: see ``devanon.forking``); by default a child
        does not get it (MADV_DONTFORK).
        """
        ps = self.page_size
        # The common case, checked in as few steps as can be (each costs a measurable
        # share of a 4 KiB map); anything else goes to the checks that name the value.
        if not (
            type(offset) is type(length) is int
            and 0 <= offset < offset + length <= self.size
            and not (offset | length) % ps
        ):
            offset, length = self._check_range(offset, length)
        if address is not None:
            address = _checks.aligned("address", address, ps, positive=True)
        if not (writable is True or writable is False) or not (inherit is False or inherit is True):
            _checks.flag("writable", writable), _checks.flag("inherit", inherit)
        if writable and not self._writable_fd:
            raise PermissionError(
                f"cannot map {self.name!r} writable: this descriptor is read-only"
            )
        prot = _PROT_RW if writable else _libc.PROT_READ
        first, last = offset // ps, (offset + length) // ps
        with self._lock:
            if self.fd < 0:
                self._check_open()
            if len(self._starts) != len(self._segments) or self._chores:
                self._begin()
            if address is None:  # the hot path, kept short
                address = self._map_counted(first, last, prot, offset)
                mapping = Mapping(self, address, offset, length, writable, inherit)
                k = bisect_left(self._starts, address)
                self._nmappings += 1  # (no interrupt between this and the insert)
                self._segments.insert(k, mapping)
                self._starts.insert(k, address)
                return mapping
            pages = [(first, last)]
            replaced: list[_Segment] = []
            if address is not None:
                self._check_owned(address, length)
                replaced = self._pieces(address, address + length)
                for seg in replaced:
                    if seg._owner._has_views():
                        raise BufferError(
                            f"cannot map over {seg._start:#x}: {seg._owner!r} has live views"
                        )
            self._gain(pages)
            try:
                self._mmap(address, length, prot, _libc.MAP_SHARED | _libc.MAP_FIXED, offset)
            except OSError:  # not an interrupt: the mapping may be there, keep its count
                self._give_back(pages)
                raise
            mapping = Mapping(self, address, offset, length, writable, inherit)
            lost = self._forget(replaced) if replaced else None
            k = bisect_left(self._starts, address)
            self._nmappings += 1  # (no interrupt between this and the insert)
            self._segments.insert(k, mapping)
            self._starts.insert(k, address)
            if lost:
                self._lose(lost)
            return mapping

    def unmap(self, address: int, length: int) -> None:
        """munmap semantics over this object's mappings: may cut one in two or span several.

        Every byte of the range must belong to this object's mappings (or overlays on them).
        Pages whose count falls to zero are freed.
        """
        address = _checks.aligned("address", address, self.page_size, positive=True)
        length = _checks.aligned("length", length, self.page_size, positive=True)
        with self._lock:
            self._check_open()
            self._begin()
            self._check_owned(address, length)
            self._unmap_spans([(address, address + length)])

    def overlay(
        self,
        address: int,
        file: int | str | os.PathLike[str],
        file_offset: int,
        length: int,
        *,
        writable: bool = False,
        under_writable_views: bool = False,
    ) -> Overlay:
        """Map ``file``'s pages (MAP_FIXED | MAP_PRIVATE) over memory this object maps.

        The pages underneath lose that count, exactly as munmap would (and are freed if it
        falls to zero). ``writable=True`` makes writes private copies; the file itself is
        never written.

        A read-only overlay is refused (BufferError) over a mapping with live writable
        views: a write through one of them there would kill the process (SIGSEGV).
        ``under_writable_views=True`` lays it anyway, for a caller that never writes where
        read-only overlays lie (a guest's memory breaks the sharing before it writes).
        """
        address = _checks.aligned("address", address, self.page_size, positive=True)
        length = _checks.aligned("length", length, self.page_size, positive=True)
        file_offset = _checks.aligned("file_offset", file_offset, PAGE_SIZE)
        _checks.flag("writable", writable)
        _checks.flag("under_writable_views", under_writable_views)
        self._check_open()
        fd, label, ours = _checks.opened("file", file, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            counted = [m for m in list(_mappers) if m._file_id == (st.st_dev, st.st_ino)]
            if any(m is self or not m.closed for m in counted):
                what = "its own file" if self in counted else f"the file of {counted[0]!r}"
                raise ValueError(
                    f"cannot overlay {self.name!r} with {what}: a private mapping of it would "
                    "go uncounted there (its pages punched under it), and keep copies no "
                    "punch frees"
                )
            file_size = _checks.file_size(fd)
            if file_offset + length > -(-file_size // PAGE_SIZE) * PAGE_SIZE:
                raise ValueError(
                    f"overlay of {label} [{file_offset:#x}, {file_offset + length:#x}) reaches "
                    f"past its end ({file_size:#x}): those pages would fault with SIGBUS"
                )
            prot = _libc.PROT_READ | (_libc.PROT_WRITE if writable else 0)
            with self._lock:
                self._check_open()
                self._begin()
                self._check_owned(address, length)
                pieces = self._pieces(address, address + length)
                if not writable and not under_writable_views:
                    for seg in pieces:
                        if seg._owner._has_writable_views():
                            raise BufferError(
                                f"cannot lay a read-only overlay at {seg._start:#x}: "
                                f"{seg._owner!r} has live writable views, and a write through "
                                "one there would kill the process (SIGSEGV); drop the views, "
                                "or pass writable=True, or under_writable_views=True if "
                                "nothing writes there"
                            )
                overlay = Overlay(self, address, label, file_offset, length, bool(writable))
                # The books first: an interrupt (a signal handler's exception) after the mmap
                # and before them would leave them saying that our own pages lie where a
                # read-only file does (a view then writable: a write, SIGSEGV). Before the
                # mmap, they say an overlay lies on our pages: views read-only, counts kept
                # (an over-count, never a page freed under a mapping).
                before = [(seg, seg._overlay, seg._forkmark) for seg in pieces]
                lost: list[PageRange] = []
                for seg in pieces:
                    seg._forkmark = False  # a new VMA
                    if seg._overlay is None:
                        if seg._counted:
                            lost.append(self._seg_pages(seg))
                    else:
                        seg._overlay._pieces -= 1
                        self._discard_overlay(seg._overlay)
                    seg._overlay = overlay
                    overlay._pieces += 1
                self._overlays.add(overlay)
                try:
                    _libc.mmap(
                        address, length, prot, _libc.MAP_PRIVATE | _libc.MAP_FIXED, fd, file_offset
                    )
                except OSError as e:  # not an interrupt: nothing was laid
                    self._unlay(overlay, before)
                    raise _checks.max_map_count_hint(e) from None
                self._lose(lost)
                return overlay
        finally:
            if ours:
                os.close(fd)

    # -- books (the lock is held) ------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{self!r} is closed")

    def _check_range(self, offset: int, length: int) -> tuple[int, int]:
        offset = _checks.aligned("offset", offset, self.page_size)
        length = _checks.aligned("length", length, self.page_size, positive=True)
        if offset + length > self.size:
            raise ValueError(
                f"range [{offset:#x}, {offset + length:#x}) reaches past the end of "
                f"{self.name!r} (size {self.size:#x})"
            )
        return offset, length

    def _seg_pages(self, seg: _Segment) -> PageRange:
        offset = seg._owner.offset_of(seg._start)
        return offset // self.page_size, (offset + seg._stop - seg._start) // self.page_size

    def _check_owned(self, address: int, length: int) -> None:
        """ValueError unless every byte of the range is in this object's segments."""
        stop = address + length
        k = bisect_right(self._starts, address) - 1
        pos = address
        while pos < stop:
            if (
                k < 0
                or k >= len(self._segments)
                or self._segments[k]._stop <= pos
                or self._segments[k]._start > pos
            ):
                raise ValueError(
                    f"address range [{address:#x}, {stop:#x}) is not all mapped by "
                    f"{self!r}: nothing of it at {pos:#x}"
                )
            pos = self._segments[k]._stop
            k += 1

    def _cut(self, address: int) -> None:
        """Split the segment holding ``address`` so that one starts there."""
        k = bisect_right(self._starts, address) - 1
        if k < 0:
            return
        seg = self._segments[k]
        if not seg._start < address < seg._stop:
            return
        tail = _Piece(address, seg._stop, seg._owner, seg._overlay, seg._counted)
        tail._forkmark = seg._forkmark
        seg._stop = address
        self._segments.insert(k + 1, tail)
        self._starts.insert(k + 1, address)
        seg._owner._pieces += 1
        if seg._overlay is not None:
            seg._overlay._pieces += 1

    def _pieces(self, start: int, stop: int) -> list[_Segment]:
        """The segments exactly covering ``[start, stop)`` (owned), cut at its edges."""
        self._cut(start)
        self._cut(stop)
        return self._segments[bisect_left(self._starts, start) : bisect_left(self._starts, stop)]

    def _forget(self, pieces: list[_Segment]) -> list[PageRange]:
        """Drop contiguous ``pieces`` from the books; returns the counted pages they held."""
        if not pieces:
            return []
        k = bisect_left(self._starts, pieces[0]._start)
        if k == len(self._segments) or self._segments[k] is not pieces[0]:
            return []  # forgotten already (an interrupt's clean-up may come after it)
        del self._segments[k : k + len(pieces)]
        del self._starts[k : k + len(pieces)]
        lost: list[PageRange] = []
        for seg in pieces:
            if seg._overlay is None:
                if seg._counted:
                    lost.append(self._seg_pages(seg))
            else:
                seg._overlay._pieces -= 1
                self._discard_overlay(seg._overlay)
            seg._owner._pieces -= 1
            if seg._owner._pieces == 0:
                self._nmappings -= 1
        return lost

    def _discard_overlay(self, overlay: Overlay) -> None:
        if overlay._pieces == 0:
            self._overlays.discard(overlay)

    def _unlay(self, overlay: Overlay, before: list[tuple[_Segment, Overlay | None, bool]]) -> None:
        """Put the books back as they were before ``overlay``, whose mmap failed."""
        self._overlays.discard(overlay)
        overlay._pieces = 0
        for seg, old, forkmark in before:
            seg._overlay, seg._forkmark = old, forkmark
            if old is not None:
                old._pieces += 1
                self._overlays.add(old)

    def _unmap_spans(self, spans: list[tuple[int, int]]) -> None:
        """Unmap owned ``spans``, refused before any call if it takes more than one and
        the process could run out of mappings part way (vm.max_map_count): so that the
        refusal changes nothing."""
        plans = [self._calls(start, stop) for start, stop in spans]
        calls = [(g[0]._start, g[-1]._stop, viewed) for plan in plans for g, viewed in plan]
        if len(calls) > 1:
            _checks.room_for_calls(calls)
        for plan in plans:
            self._make_calls(plan)

    def _calls(self, start: int, stop: int) -> list[tuple[list[_Segment], bool]]:
        """How owned ``[start, stop)`` is unmapped: one call for each stretch of pieces,
        a quarantine (True) where mappings have live views, a munmap elsewhere."""
        calls: list[tuple[list[_Segment], bool]] = []
        for seg in self._pieces(start, stop):
            viewed = seg._owner._has_views()
            if calls and calls[-1][1] == viewed and calls[-1][0][-1]._stop == seg._start:
                calls[-1][0].append(seg)
            else:
                calls.append(([seg], viewed))
        return calls

    def _unmap_owned(self, start: int, stop: int) -> None:
        """Unmap owned ``[start, stop)``: quarantine pieces with live views, munmap the rest."""
        self._make_calls(self._calls(start, stop))

    def _make_calls(self, calls: list[tuple[list[_Segment], bool]]) -> None:
        """Make the calls ``_calls`` planned for one stretch, and forget what they unmapped
        (the pieces done before a call that fails included)."""
        lost: list[PageRange] = []
        unheld, self._unreleased = self._unreleased, []
        calling: list[_Segment] = []
        """A group whose call an interrupt (a signal handler's exception) may have cut
        off before or after it: out of the books all the same (they must never name what
        may not be mapped any more), its count kept (an over-count frees no page)."""
        try:
            for group, viewed in calls:
                first, length = group[0]._start, group[-1]._stop - group[0]._start
                calling = group
                try:
                    if viewed:
                        quarantine(first, length)
                    else:
                        _libc.munmap(first, length)
                except OSError as e:
                    calling = []
                    raise _checks.max_map_count_hint(e) from None
                lost += self._forget(group)  # at once, not in the finally: an interrupt
                calling = []  # there would stop it (the count can wait: an over-count)
                if viewed:  # each mapping keeps its piece until its last view dies
                    unheld += [
                        (s._start, s._stop - s._start)
                        for s in group
                        if not s._owner._hold(s._start, s._stop - s._start)
                    ]
        finally:
            if calling:
                self._forget(calling)
            if lost:
                self._lose(lost)
            # Pieces whose last view died meanwhile: unmapped after the calls, whose room
            # was counted without these cuts into a quarantine.
            self._release(unheld)

    def _release(self, ranges: list[tuple[int, int]]) -> None:
        """munmap quarantined ranges no view needs; those the limit refuses are kept in
        ``_unreleased``, tried again at the next unmap."""
        for address, length in ranges:
            try:
                _libc.munmap(address, length)
            except OSError:  # at the limit: reserved until an unmap finds room
                self._unreleased.append((address, length))

    def _mmap(self, address: int, length: int, prot: int, flags: int, offset: int) -> int:
        try:
            return _libc.mmap(address, length, prot, flags, self.fd, offset)
        except OSError as e:
            raise self._mmap_error(e) from None

    def _mmap_error(self, err: OSError) -> OSError:
        """ENOMEM from mmap, explained: the huge page pool, or vm.max_map_count."""
        if self.hugepages:
            return _checks.hugepage_hint(err)
        return _checks.max_map_count_hint(err)

    def _unmap_all(self) -> None:
        """Unmap every mapping and overlay (closing)."""
        self._in_step()  # (whatever the lengths say: or this loop might never end)
        while self._segments:
            first = self._segments[0]
            stop = first._stop
            for seg in self._segments[1:]:
                if seg._start != stop:
                    break
                stop = seg._stop
            left = len(self._segments)
            self._unmap_owned(first._start, stop)
            if len(self._segments) >= left:  # (a bug, not a state to spin in)
                raise RuntimeError(f"unmapping {first!r} of {self!r} left it in the books")
        unheld, self._unreleased = self._unreleased, []
        self._release(unheld)  # what the limit still refuses, the process keeps

    # -- called by Mapping and Overlay ---------------------------------------------------

    def _view(self, mapping: Mapping) -> memoryview:
        with self._lock:
            self._check_open()
            if len(self._starts) != len(self._segments):
                self._in_step()
            lo = bisect_left(self._starts, mapping.address)
            hi = bisect_left(self._starts, mapping.address + mapping.length)
            mine = [seg for seg in self._segments[lo:hi] if seg._owner is mapping]
            if sum(seg._stop - seg._start for seg in mine) != mapping.length:
                raise ValueError(f"{mapping!r} is not wholly mapped any more: no view of it")
            read_only_overlay = any(
                seg._overlay is not None and not seg._overlay.writable for seg in mine
            )
            if mapping._views is None:
                mapping._views = ViewTracker()
            return mapping._views.view(
                mapping.address,
                mapping.length,
                readonly=not mapping.writable or read_only_overlay,
            )

    def _close_mapping(self, mapping: Mapping) -> None:
        with self._lock:
            if self.fd < 0:
                self._check_open()
            if mapping._pieces == 0:
                raise ValueError(f"{mapping!r} is already closed")
            if len(self._starts) != len(self._segments) or self._chores:
                self._begin()
            if mapping._pieces == 1 and (mapping._views is None or not mapping._views.live):
                # The hot path, kept short: one whole segment, no overlay, no view.
                k = bisect_left(self._starts, mapping.address)
                seg = self._segments[k]
                if (
                    seg is mapping
                    and seg._overlay is None
                    and seg._counted
                    and seg._stop - seg._start == mapping.length
                ):
                    # The books first: an interrupt (a signal handler's exception) after
                    # the munmap and before them would leave a range in them that the
                    # kernel may hand to someone else, and a later unmap would take it.
                    # (Nothing between here and the munmap's return lets one in; after
                    # it, the mapping is closed and its count kept: an over-count.)
                    del self._segments[k]
                    del self._starts[k]
                    mapping._pieces = 0
                    self._nmappings -= 1
                    if _libc.munmap_status(seg._start, mapping.length):
                        err = _libc.munmap_error(seg._start, mapping.length)
                        self._segments.insert(k, seg)
                        self._starts.insert(k, seg._start)
                        mapping._pieces = 1
                        self._nmappings += 1
                        raise _checks.max_map_count_hint(err)
                    ps = self.page_size
                    self._lose_one(mapping.offset // ps, (mapping.offset + mapping.length) // ps)
                    return
            lo = bisect_left(self._starts, mapping.address)
            hi = bisect_left(self._starts, mapping.address + mapping.length)
            spans: list[list[int]] = []
            for seg in self._segments[lo:hi]:
                if seg._owner is not mapping:
                    continue
                if spans and spans[-1][1] == seg._start:
                    spans[-1][1] = seg._stop
                else:
                    spans.append([seg._start, seg._stop])
            self._unmap_spans([(start, stop) for start, stop in spans])

    def _release_overlay(self, overlay: Overlay) -> None:
        with self._lock:
            self._check_open()
            if overlay.released:
                raise ValueError(f"{overlay!r} is already released")
            self._begin()
            lo = bisect_left(self._starts, overlay.address)
            hi = bisect_left(self._starts, overlay.address + overlay.length)
            for seg in self._segments[lo:hi]:
                if seg._overlay is not overlay:
                    continue
                owner = seg._owner
                prot = _libc.PROT_READ | (_libc.PROT_WRITE if owner.writable else 0)
                pages = [self._seg_pages(seg)]
                self._gain(pages)
                try:
                    self._mmap(
                        seg._start,
                        seg._stop - seg._start,
                        prot,
                        _libc.MAP_SHARED | _libc.MAP_FIXED,
                        owner.offset_of(seg._start),
                    )
                except OSError:  # not an interrupt: the mapping may be there
                    self._give_back(pages)
                    raise
                seg._overlay = None
                seg._counted = True
                seg._forkmark = False
                overlay._pieces -= 1
            self._discard_overlay(overlay)

    # -- fork (devanon.forking holds the lock from before fork() to after) ------------------

    def _prepare_fork(self, lifeline: int) -> None:
        """Just before fork(): MADV_DONTFORK on every piece not made with ``inherit=True``.

        Done here, once per piece, rather than at every map: it saves a syscall on the hot
        path. A fork from C code that skips Python's fork hooks (and does not exec) would
        therefore keep uncounted copies; ``os.fork``, ``multiprocessing`` and ``subprocess``
        are fine. Should madvise fail (ENOMEM at vm.max_map_count), the child unmaps the
        copies itself (``_drop_uninherited``).
        """
        runs: list[list[_Segment]] = []
        for seg in self._segments:
            if seg._owner.inherit or seg._forkmark:
                continue
            if runs and runs[-1][-1]._stop == seg._start:
                runs[-1].append(seg)  # neighbours: one call
            else:
                runs.append([seg])
        for run in runs:
            try:
                _libc.madvise(run[0]._start, run[-1]._stop - run[0]._start, _libc.MADV_DONTFORK)
            except OSError:
                continue
            for seg in run:
                seg._forkmark = True

    def _inherited_pages(self) -> list[PageRange]:
        """The counted pages of inherited mappings (a child gets these)."""
        return [
            self._seg_pages(s)
            for s in self._segments
            if s._owner.inherit and s._overlay is None and s._counted
        ]

    def _drop_uninherited(self, everything: bool = False) -> list[PageRange]:
        """In a child: forget the mappings MADV_DONTFORK kept from it (``everything``: and
        unmap the inherited ones too); returns their pages.

        Their views, copied with the heap, would point at nothing: quarantine them.
        """
        lost: list[PageRange] = []
        for seg in [s for s in self._segments if everything or not s._owner.inherit]:
            k = bisect_left(self._starts, seg._start)
            if k == len(self._segments) or self._segments[k] is not seg:
                continue  # forgotten meanwhile (by a nested fork's child, running this too)
            if not seg._owner._retire(seg._start, seg._stop - seg._start) and not seg._forkmark:
                with contextlib.suppress(OSError):  # MADV_DONTFORK failed: unmap our copy
                    _libc.munmap(seg._start, seg._stop - seg._start)
            lost += self._forget([seg])
        return lost
