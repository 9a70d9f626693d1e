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


def room_for_mappings(more: int) -> None:
    """The max_map_count OSError unless this process may hold ``more`` mappings more."""
    held, limit = mappings_held()
    if held + more > limit:
        raise _at_the_limit(f"{more} more mappings could be needed", held, limit)


def mappings_held() -> tuple[int, int]:
    """``(mappings this process holds, vm.max_map_count)``: /proc/self/maps less
    [vsyscall], which the kernel does not count."""
    with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
        limit = int(f.read())
    with open("/proc/self/maps", "rb") as f:
        held = sum(1 for line in f if not line.endswith(b"[vsyscall]\n"))
    return held, limit


def _at_the_limit(what: str, held: int, limit: int) -> OSError:
    return OSError(
        errno.ENOMEM,
        f"{what}: this process holds {held} mappings, vm.max_map_count is {limit} "
        "(/proc/sys/vm/max_map_count); map extents rather than single pages, or raise the limit",
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
    device is taken: anything else is refused (ValueError) before it is used, and a FIFO
    is opened without waiting for its other end. A descriptor that is not open: OSError
    naming it."""
    target = path_or_fd(label, value)
    if isinstance(target, int):
        fd, name, ours = target, f"fd {target}", False
    else:
        name = target
        _file_kind(label, name, os.stat(target).st_mode)  # a FIFO: before opening it
        fd, ours = os.open(target, flags | os.O_NONBLOCK | os.O_CLOEXEC), True
    try:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            raise OSError(e.errno, f"{label} {name}: {e.strerror}") from None
        _file_kind(label, name, mode)
        if ours:  # the rest as a plain descriptor would be
            os.set_blocking(fd, True)
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
