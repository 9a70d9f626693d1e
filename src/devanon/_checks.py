"""Argument checks shared by the public API: every message names the bad value."""

from __future__ import annotations

import errno
import os
import stat


def integer(label: str, value: object) -> int:
    """``value`` as an int; TypeError for anything else (bool included)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{label} must be an int, not {type(value).__name__} {value!r}")
    return value


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
    """The max_map_count OSError unless this process has room for every mapping that
    ``calls`` could make on the way: ``(start, stop, quarantined)`` in address order, each
    an mmap(MAP_FIXED) of a quarantine or a munmap, of memory mapped now.

    A call can split the mapping its start or its stop falls strictly inside (one more
    each); a quarantine adds itself, a munmap removes at least one. A call that starts
    where the one before stopped starts on a boundary (a quarantine's edge, or a hole).
    The most the running sum reaches is what must fit.
    """
    edges = sorted({edge for start, stop, _ in calls for edge in (start, stop)})
    try:
        held, inside = _mappings_around(edges)
    except MemoryError:  # at the limit, Python may find no memory for reading the list
        raise _at_the_limit(f"unmapping this takes {len(calls)} calls", -1, -1) from None
    more = peak = 0
    stopped = -1
    for start, stop, quarantined in calls:
        more += (start != stopped and start in inside) + (stop in inside) - (not quarantined)
        peak = max(peak, more)
        stopped = stop
    limit = _max_map_count()
    if held + peak > limit:
        raise _at_the_limit(
            f"unmapping this takes {len(calls)} calls, which could need {peak} more mappings",
            held,
            limit,
        )


def mappings_held() -> tuple[int, int]:
    """``(mappings this process holds, vm.max_map_count)``."""
    return _mappings_around([])[0], _max_map_count()


def _max_map_count() -> int:
    with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
        return int(f.read())


def _mappings_around(addresses: list[int]) -> tuple[int, set[int]]:
    """How many mappings this process holds (/proc/self/maps less [vsyscall], which the
    kernel does not count), and which of the sorted ``addresses`` fall strictly inside
    one. Read line by line: near the limit there is little room for a list of them all."""
    held, inside, i = 0, set(), 0
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            if line.endswith(b"[vsyscall]\n"):
                continue
            held += 1
            if i == len(addresses):
                continue
            lo_text, _, hi_text = line.partition(b" ")[0].partition(b"-")
            lo, hi = int(lo_text, 16), int(hi_text, 16)
            while i < len(addresses) and addresses[i] <= lo:
                i += 1
            while i < len(addresses) and addresses[i] < hi:
                inside.add(addresses[i])
                i += 1
    return held, inside


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
        name = target
        _file_kind(label, name, os.stat(target).st_mode)  # a FIFO: before opening it
        fd, ours = os.open(target, flags | os.O_NOCTTY | os.O_CLOEXEC), True
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
    """Bytes in a regular file or a block device (whose ``st_size`` is 0)."""
    st = os.fstat(fd)
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
