"""Argument checks shared by the public API: every message names the bad value."""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import stat
from collections.abc import Iterator


def integer(label: str, value: object) -> int:
    """``value`` as an int: an int, or an integer of another type (one with ``__index__``,
    such as a NumPy integer), as ``os`` and ``mmap`` take them; TypeError for anything
    else (a bool, a float, a string)."""
    if type(value) is int:
        return value
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            return operator.index(value)  # type: ignore[arg-type]
    raise TypeError(f"{label} must be an int, not {type(value).__name__} {value!r}")


def flag(label: str, value: object) -> bool:
    """``value`` if it is a bool; TypeError for anything else (an int, a string "no")."""
    if not isinstance(value, bool):
        raise TypeError(f"{label} must be True or False, not {type(value).__name__} {value!r}")
    return value


def aligned(label: str, value: object, alignment: int, *, positive: bool = False) -> int:
    """An int that is >= 0 (> 0 with ``positive``) and a multiple of ``alignment``."""
    n = integer(label, value)
    if positive and n <= 0:
        raise ValueError(f"{label} must be positive, not {n}")
    if n < 0:
        raise ValueError(f"{label} must not be negative, not {n}")
    if n % alignment:
        raise ValueError(f"{label} {n:#x} is not a multiple of the page size ({alignment:#x})")
    return n


def blocks(first: int, count: int, total: int, *, closed: str | None, inside: str) -> None:
    """ValueError unless ``[first, first+count)`` is a non-empty range of the ``total``
    blocks of ``inside``; ``closed`` names the object if it is closed."""
    if closed is not None:
        raise ValueError(f"{closed} is closed")
    if first < 0 or count <= 0 or first + count > total:
        raise ValueError(f"blocks [{first}, {first + count}) are outside {inside} ({total} blocks)")


def max_map_count_hint(err: OSError) -> OSError:
    """Explain an ENOMEM from mmap/munmap/madvise: usually vm.max_map_count, not RAM."""
    if err.errno != errno.ENOMEM:
        return err
    try:
        held, limit = mappings_held()
    except OSError:
        return err
    if held + 2 < limit:
        return err
    return _at_the_limit(err.strerror or "ENOMEM", held, limit)


def room_for_calls(calls: list[tuple[int, int, bool]]) -> None:
    """The max_map_count OSError unless every one of ``calls`` would go through:
    ``(start, stop, quarantined)`` in address order, each an mmap(MAP_FIXED) of a
    quarantine or a munmap, of memory mapped now.

    They are played against the mappings /proc/self/maps shows, by the kernel's rules
    (mm/vma.c, ``vms_gather_munmap_vmas`` and ``do_mmap``): a call that cuts one mapping
    on both sides is refused while the process holds ``vm.max_map_count`` mappings or
    more, an mmap while it holds more; a call adds its quarantine and the far piece of a
    mapping it cuts on both sides, and removes the mappings it covers whole. Neighbours
    the kernel merges are not counted: they only give room.
    """
    try:
        held, facts = _cuts_and_covers(calls)
    except MemoryError:  # at the limit, Python may find no memory for reading the list
        raise _at_the_limit(f"unmapping this takes {len(calls)} calls", -1, -1) from None
    limit = _max_map_count()
    count = held
    for (_, _, quarantined), (both_sides, covered) in zip(calls, facts, strict=True):
        if (quarantined and count > limit) or (both_sides and count >= limit):
            raise _at_the_limit(
                f"unmapping this takes {len(calls)} calls, and one of them would be refused "
                "after others were made",
                held,
                limit,
            )
        count += quarantined + both_sides - covered


def _cuts_and_covers(calls: list[tuple[int, int, bool]]) -> tuple[int, list[tuple[bool, int]]]:
    """The mappings this process holds, and for each call (made in order): whether it cuts
    one mapping on both sides, and how many it covers whole once the calls before it are
    made (a call that starts where the one before stopped starts on a boundary)."""
    n = len(calls)
    cut_at_start: list[int | None] = [None] * n
    cut_at_stop: list[int | None] = [None] * n
    covered = [0] * n
    rest_covered = [False] * n  # the mapping cut at the start ends inside the call
    held, j = 0, 0
    for line in _maps_lines():
        held += 1
        if j < n:
            lo_text, _, hi_text = line.partition(b" ")[0].partition(b"-")
            lo, hi = int(lo_text, 16), int(hi_text, 16)
            while j < n and calls[j][1] <= lo:
                j += 1
            k = j
            while k < n and calls[k][0] < hi:
                start, stop, _ = calls[k]
                if lo < start < hi:
                    cut_at_start[k] = held
                    rest_covered[k] = hi <= stop
                if lo < stop < hi:
                    cut_at_stop[k] = held
                if start <= lo and hi <= stop:
                    covered[k] += 1
                k += 1
    facts = []
    for k, (start, _, _) in enumerate(calls):
        if k and calls[k - 1][1] == start:  # the call before cut there already
            facts.append((False, covered[k] + rest_covered[k]))
        else:
            both = cut_at_start[k] is not None and cut_at_start[k] == cut_at_stop[k]
            facts.append((both, covered[k]))
    return held, facts


def mappings_held() -> tuple[int, int]:
    """``(mappings this process holds, vm.max_map_count)``."""
    return sum(1 for _ in _maps_lines()), _max_map_count()


def _max_map_count() -> int:
    with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
        return int(f.read())


def _maps_lines() -> Iterator[bytes]:
    """The lines of /proc/self/maps the kernel counts as mappings (all but [vsyscall]),
    read one at a time: near the limit there is little room for a list of them all."""
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            if not line.endswith(b"[vsyscall]\n"):
                yield line


def _at_the_limit(what: str, held: int, limit: int) -> OSError:
    where = (
        "this process is at vm.max_map_count"
        if held < 0
        else f"this process holds {held} mappings, vm.max_map_count is {limit}"
    )
    return OSError(
        errno.ENOMEM,
        f"{what}: {where} (/proc/sys/vm/max_map_count); map extents rather than single "
        "pages, or raise the limit",
    )


def hugepage_hint(err: OSError) -> OSError:
    """Explain an ENOMEM on a hugetlb mapping: the huge page pool is empty."""
    if err.errno != errno.ENOMEM:
        return err
    return OSError(
        errno.ENOMEM,
        f"{err.strerror}: not enough free huge pages "
        f"(HugePages_Free {free_hugepages()}); raise /proc/sys/vm/nr_hugepages",
    )


def free_hugepages() -> int:
    """Free, unreserved huge pages of the default size, from /proc/meminfo."""
    values: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("HugePages_Free", "HugePages_Rsvd"):
                values[key] = int(rest.split()[0])
    return values.get("HugePages_Free", 0) - values.get("HugePages_Rsvd", 0)


def path_or_fd(label: str, value: object) -> int | str:
    """A file descriptor or a path (str or PathLike) as given."""
    if isinstance(value, bool) or not isinstance(value, int | str | os.PathLike):
        raise TypeError(f"{label} must be a file descriptor or a path, not {value!r}")
    return value if isinstance(value, int) else os.fspath(value)


def opened(label: str, value: object, flags: int) -> tuple[int, str, bool]:
    """``(fd, name, ours)`` for a file given as a descriptor or a path (opened here with
    ``flags``, then ``ours`` is True: the caller closes it). Only a regular file or a block
    device is taken: anything else is refused (ValueError) before it is used (a path before
    it is opened: opening a FIFO would wait for its other end). A descriptor that is not
    open: OSError naming it."""
    target = path_or_fd(label, value)
    if isinstance(target, int):
        fd, name, ours = target, f"fd {target}", False
    else:
        # Looked at before it is opened: opening a FIFO waits for its other end. Opened
        # without waiting too (should the path change in between), except where a lease
        # makes that fail at once: then as any open, waiting for the lease to break.
        name = target
        _file_kind(label, name, os.stat(target).st_mode)
        mode = flags | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(target, mode | os.O_NONBLOCK)
        except BlockingIOError:
            fd = os.open(target, mode)
        os.set_blocking(fd, True)
        ours = True
    try:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            raise OSError(e.errno, f"{label} {name}: {e.strerror}") from None
        _file_kind(label, name, mode)
    except BaseException:
        if ours:
            os.close(fd)
        raise
    return fd, name, ours


def _file_kind(label: str, name: str, mode: int) -> None:
    """ValueError unless ``mode`` is a regular file's or a block device's."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    kinds = {
        stat.S_ISDIR: "directory",
        stat.S_ISFIFO: "FIFO",
        stat.S_ISSOCK: "socket",
        stat.S_ISCHR: "character device",
    }
    kind = next((kind for test, kind in kinds.items() if test(mode)), "special file")
    raise ValueError(f"{label} {name} is a {kind}, not a regular file or a block device")


def file_size(fd: int) -> int:
    """Bytes in a regular file or a block device (whose ``st_size`` is 0: its end, found
    by lseek, the descriptor's position put back)."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    here = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.lseek(fd, here, os.SEEK_SET)
