"""Argument checks shared by the public API: every message names the bad value."""

from __future__ import annotations

import errno
import os


def integer(label: str, value: object) -> int:
    """``value`` as an int; TypeError for anything else (bool included)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{label} must be an int, not {type(value).__name__} {value!r}")
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
        with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            held = sum(1 for _ in f)
    except OSError:
        return err
    if held + 2 < limit:
        return err
    return OSError(
        errno.ENOMEM,
        f"{err.strerror}: this process holds {held} mappings, vm.max_map_count is {limit} "
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
