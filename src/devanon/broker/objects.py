"""A named shared object in the daemon: one memfd, its counts per client, owner and mode.

The total count of a page is the sum over every client (and every pinned forked child) of
the times it maps the page: the RFC's device, whose count summed over all the processes that
mapped it. A page whose total falls to zero is punched at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from dataclasses import dataclass, field

from devanon.counts import DENSE_CHUNK, MapCounts, PageRange
from devanon.mapper import MEMFD_LABEL_MAX, PAGE_SIZE
from devanon.punch import punch_pages, uncounted

READ = 4
WRITE = 2

MAX_CLIENT_RUNS = 1 << 18
"""Runs one client's counts of one object may take (4 MiB). A process holds at most
vm.max_map_count (65530) mappings, two run boundaries each: a client past this is not
counting real mappings, and must not make the daemon's memory its own."""
MAX_CLIENT_DENSE = 1 << 12
"""Dense chunks one client's counts of one object may take (16 MiB at a byte a page)."""
MAX_PINNED_RANGES = 1 << 18
"""Ranges of one object pinned for forked children by one uid, over all its pins."""
_DROP_WINDOW = 64 * DENSE_CHUNK
"""Pages of a client's counts dropped at a time, last first (``drop``)."""


@dataclass(slots=True)
class Pin:
    """Counts held for a forked child until its lifeline (a pipe read end) reads EOF."""

    lifeline: int
    ranges: list[PageRange]
    uid: int = 0
    """Who asked for it (the daemon holds its lifeline: a descriptor per pin)."""
    pid: int = 0
    """The process that asked for it: the parent, which holds the write end until the
    fork is done, and whose maps never show the child's copy."""


@dataclass(eq=False)
class SharedObject:
    """One named object: a sealed memfd, who owns it, and who maps which page how often."""

    name: str
    size: int
    uid: int
    gid: int
    mode: int
    fd: int = -1
    page_size: int = PAGE_SIZE
    counts: MapCounts = field(init=False)
    holders: dict[int, MapCounts] = field(default_factory=dict)
    """Client id -> what that client maps."""
    handles: dict[int, int] = field(default_factory=dict)
    """Client id -> how many handles it has open."""
    pins: list[Pin] = field(default_factory=list)
    unlinked: bool = False
    swept_to: int = 0
    """The page the sweep of data in uncounted pages goes on from (``sweep``)."""
    freed_bytes: int = 0
    punch_calls: int = 0

    def __post_init__(self) -> None:
        self.counts = MapCounts(self.size // self.page_size)
        if self.fd < 0:
            fd = os.memfd_create(memfd_label(self.name), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                # A memfd's inode is mode 0777: anyone holding a read-only descriptor could
                # reopen /proc/self/fd/N for writing. 0600 leaves that to the daemon alone.
                os.fchmod(fd, 0o600)
                os.ftruncate(fd, self.size)
                fcntl.fcntl(
                    fd,
                    fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
                )
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd

    # -- permissions ---------------------------------------------------------------------

    def allows(self, uid: int, gids: set[int], want: int) -> bool:
        """Like a file: owner, group or other bits of ``mode``; root passes."""
        return self.rights(uid, self.uid, self.gid, gids, self.mode) & want == want

    @staticmethod
    def rights(uid: int, owner: int, group: int, gids: set[int], mode: int) -> int:
        """READ | WRITE bits that ``mode`` gives ``uid``, as on a file; root gets both."""
        if uid == 0:
            return READ | WRITE
        if uid == owner:
            return (mode >> 6) & 7
        if group in gids:
            return (mode >> 3) & 7
        return mode & 7

    def descriptor(self, writable: bool) -> int:
        """A new descriptor for a client: read-only unless ``writable``, so the kernel
        enforces it (a read-only descriptor cannot be mapped shared and writable)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        return os.open(f"/proc/self/fd/{self.fd}", flags)

    # -- counts ----------------------------------------------------------------------------

    def page_range(self, offset: int, length: int) -> PageRange:
        """A byte range as a page range; ValueError naming a bad one."""
        ps = self.page_size
        if length <= 0 or offset % ps or length % ps or offset + length > self.size:
            raise ValueError(
                f"range [{offset:#x}, +{length:#x}) is not page-aligned within "
                f"{self.name!r} (size {self.size:#x})"
            )
        return offset // ps, (offset + length) // ps

    def pages(self, ranges: list[tuple[int, int]]) -> list[PageRange]:
        """Byte ranges as page ranges; ValueError naming a bad one."""
        return [self.page_range(offset, length) for offset, length in ranges]

    def room_for(self, client: int, nranges: int) -> None:
        """OSError(ENOMEM), changing nothing, unless ``client`` may map ``nranges`` more
        ranges (each makes at most two runs, or one more dense chunk)."""
        holder = self.holders.get(client)
        if holder is None:
            return
        if (
            holder.nruns() + 2 * nranges > MAX_CLIENT_RUNS
            or holder.ndense() + nranges > MAX_CLIENT_DENSE
        ):
            raise self._too_many(
                f"{nranges} more ranges (each may add two runs or one dense chunk of "
                f"{DENSE_CHUNK} pages) could take this client's counts of {self.name!r} "
                "past what the daemon keeps for one client; they are",
                holder,
                "map fewer ranges at a time, or unmap first",
            )

    def _split_too_far(self, holder: MapCounts, runs: int, dense: int) -> OSError | None:
        """ENOMEM if an unmap took ``holder`` from ``runs`` runs and ``dense`` dense chunks
        past what the daemon keeps for one client (an unmap inside a run splits it in
        three): the caller undoes it. Refusing only over-counts, until the client lets go."""
        now_runs, now_dense = holder.nruns(), holder.ndense()
        if (now_runs > MAX_CLIENT_RUNS and now_runs > runs) or (
            now_dense > MAX_CLIENT_DENSE and now_dense > dense
        ):
            return self._too_many(
                f"this unmap would split this client's counts of {self.name!r} into",
                holder,
                "unmap whole mapped ranges (these pages stay counted until the client "
                "closes the object)",
            )
        return None

    @staticmethod
    def _too_many(what: str, holder: MapCounts, remedy: str) -> OSError:
        """ENOMEM: ``what`` ``holder``'s figures, past the cap, and what to do."""
        return OSError(
            errno.ENOMEM,
            f"{what} {holder.nruns()} runs and {holder.ndense()} dense chunks (the most: "
            f"{MAX_CLIENT_RUNS} and {MAX_CLIENT_DENSE}); {remedy}",
        )

    def map_one(self, client: int, first: int, last: int) -> None:
        holder = self.holders.get(client)
        if holder is None:
            holder = self.holders[client] = MapCounts(self.counts.npages)
        holder.change_ints(first, last, 1)  # (ints: page_range made them)
        self.counts.change_ints(first, last, 1)

    def unmap_one(self, client: int, first: int, last: int) -> None:
        """Drop one range of ``client``'s counts (ValueError, changing nothing, if it does
        not hold it; OSError(ENOMEM), changing nothing, if that would split them past the
        cap) and punch what falls to zero."""
        holder = self.holders.get(client)
        if holder is None:
            raise ValueError(f"this client maps nothing of {self.name!r}")
        runs, dense = holder.nruns(), holder.ndense()
        was_dense = holder.dense_edges(first, last) if dense else set()
        try:
            holder.change_ints(first, last, -1)
        except ValueError as e:
            raise ValueError(f"{self.name!r}: this client does not map that: {e}") from None
        if holder.nruns() > runs or holder.ndense() > dense:  # (else it cannot be too far)
            refused = self._split_too_far(holder, runs, dense)
            if refused is not None:
                _add_back(holder, [(first, last)], was_dense)
                raise refused
        zeros = self.counts.change_ints(first, last, -1)
        if zeros:
            self.punch(zeros)

    def map(self, client: int, ranges: list[PageRange]) -> None:
        for first, last in ranges:
            self.map_one(client, first, last)

    def unmap(self, client: int, ranges: list[PageRange]) -> None:
        """Drop ``client``'s counts; ValueError (changing nothing) if it does not hold them,
        OSError(ENOMEM) (changing nothing) if that would split them past the cap."""
        holder = self.holders.get(client)
        if holder is None:
            raise ValueError(f"this client maps nothing of {self.name!r}")
        runs, dense = holder.nruns(), holder.ndense()
        was_dense = set().union(*(holder.dense_edges(a, b) for a, b in ranges)) if dense else set()
        done: list[PageRange] = []
        try:
            for first, last in ranges:
                holder.remove(first, last)
                done.append((first, last))
        except ValueError as e:
            _add_back(holder, done, was_dense)
            raise ValueError(f"{self.name!r}: this client does not map that: {e}") from None
        refused = self._split_too_far(holder, runs, dense)
        if refused is not None:
            _add_back(holder, done, was_dense)
            raise refused
        zeros: list[PageRange] = []
        for first, last in ranges:
            zeros += self.counts.remove(first, last)
        self.punch(zeros)

    def mapped_by(self, client: int) -> int:
        """Bytes ``client`` maps at least once."""
        holder = self.holders.get(client)
        return 0 if holder is None else holder.mapped_pages() * self.page_size

    def drop(self, client: int) -> None:
        """A client is gone (or closed its handles): every count it held goes."""
        holder = self.holders.pop(client, None)
        if holder is None:
            return
        zeros: list[PageRange] = []
        # The last first: each removal works near the end of the object's arrays (the
        # first first, each would move every run after it: 15 s of the daemon's time for
        # a client at its cap of runs, instead of 1); a dense chunk a window at a time.
        for first, last, n in holder.runs_last_first(_DROP_WINDOW):
            if n:
                zeros += self.counts.remove(first, last, n)
        self.punch(zeros)

    def pin(self, lifeline: int, ranges: list[PageRange], uid: int = 0, pid: int = 0) -> None:
        # Per user: one reader's pins must not use up what the owner's forks need.
        pinned = sum(len(pin.ranges) for pin in self.pins if pin.uid == uid)
        if pinned + len(ranges) > MAX_PINNED_RANGES:
            raise OSError(
                errno.ENOMEM,
                f"uid {uid} has {pinned} ranges of {self.name!r} pinned for forked children "
                f"already; the daemon keeps at most {MAX_PINNED_RANGES} for one user",
            )
        for first, last in ranges:
            self.counts.add(first, last)
        self.pins.append(Pin(lifeline, ranges, uid, pid))

    def unpin(self, lifeline: int, *, close: bool = True) -> None:
        """A forked child is gone (its lifeline read EOF): drop its pin (and close the
        lifeline, unless told not to)."""
        for pin in self.pins:
            if pin.lifeline == lifeline:
                self.pins.remove(pin)
                if close:
                    os.close(lifeline)
                zeros: list[PageRange] = []
                for first, last in pin.ranges:
                    zeros += self.counts.remove(first, last)
                self.punch(zeros)
                return

    def sweep(self, until: float) -> bool:
        """Punch data that lies in pages nobody counts (``punch.uncounted``), from where the
        last call stopped, a step at a time until ``time.monotonic()`` passes ``until``;
        True once the walk reached the end (the next one starts over).

        A client that maps without telling the daemon (a read fault fills a page too) or
        writes with ``pwrite`` puts such data there, and no unmap would ever free it. The
        protocol lets no one rely on it: a page is touched only once its MAP was said yes
        to (its count is then above 0)."""
        for stop, zeros in uncounted(self.fd, self.counts, self.page_size, self.swept_to):
            if zeros:
                self.punch(zeros)
            if time.monotonic() > until:
                self.swept_to = stop
                return False
        self.swept_to = 0
        return True

    def punch(self, zeros: list[PageRange]) -> None:
        calls, freed = punch_pages(self.fd, zeros, self.page_size, name=self.name)
        self.punch_calls += calls
        self.freed_bytes += freed

    # -- life ------------------------------------------------------------------------------

    @property
    def in_use(self) -> bool:
        return bool(self.handles) or bool(self.holders) or bool(self.pins)

    def close(self) -> None:
        for pin in self.pins:
            os.close(pin.lifeline)
        self.pins.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def resident_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def identity(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of the memfd, as clients' /proc/PID/maps will show it."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "size": self.size,
            "page_size": self.page_size,
            "owner_uid": self.uid,
            "owner_gid": self.gid,
            "mode": f"{stat.S_IMODE(self.mode):04o}",
            "mapped_bytes": self.counts.mapped_pages() * self.page_size,
            "resident_bytes": self.resident_bytes(),
            "freed_bytes": self.freed_bytes,
            "punch_calls": self.punch_calls,
            "count_runs": self.counts.nruns(),
            "count_bytes": self.counts.nbytes(),
            "unlinked": self.unlinked,
            "pinned_children": len(self.pins),
            "inode": self.identity()[1],
        }


def memfd_label(name: str) -> str:
    """The memfd's name for object ``name`` (in /proc/PID/fd and maps): ``devanon:`` and
    the name, cut at a whole character to what the kernel takes. Only a label: the
    daemon knows its objects by their names, which may be 255 bytes."""
    return f"devanon:{name}".encode()[:MEMFD_LABEL_MAX].decode("utf-8", "ignore")


def _add_back(holder: MapCounts, ranges: list[PageRange], was_dense: set[int]) -> None:
    """Undo the removal of ``ranges`` from ``holder``, and turn back into runs the chunks
    it made dense (``was_dense``: the dense ones at the ranges' edges before it)."""
    for first, last in ranges:
        holder.add(first, last)
    for first, last in ranges:
        holder.compact(first, last, was_dense)


def no_such(name: str) -> OSError:
    return FileNotFoundError(errno.ENOENT, f"no object named {name!r}")
