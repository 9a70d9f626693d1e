"""The kernel's truth about who maps an object: clients' /proc/PID/maps."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable

from devanon.counts import MapCounts


def add_maps_of(
    pid: int,
    dev: int,
    ino: int,
    page_size: int,
    into: MapCounts,
    pidfd: int | None = None,
    in_time: Callable[[], None] = lambda: None,
) -> None:
    """Add every page of the file ``(dev, ino)`` that ``pid`` maps to ``into``.

    A VMA never shows one file page twice, so "VMAs covering the page" is "times mapped".
    A process that is gone adds nothing; with its ``pidfd``, so does one whose pid another
    process may have taken before the maps were read (it is alive after the read, so the
    pid was its own all along). The maps are read a line at a time (their owner makes
    them as long as it likes), calling ``in_time`` now and then: it may raise.
    """
    major, minor = os.major(dev), os.minor(dev)
    mapped: list[tuple[int, int]] = []
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f):
                if not n % 4096:
                    in_time()
                fields = line.split(maxsplit=5)
                if len(fields) < 5 or int(fields[4]) != ino:
                    continue
                dev_major, dev_minor = (int(x, 16) for x in fields[3].split(":"))
                if (dev_major, dev_minor) != (major, minor):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                first = int(fields[2], 16) // page_size
                last = min(first + (end - start) // page_size, into.npages)
                if first < last:
                    mapped.append((first, last))
    except (FileNotFoundError, ProcessLookupError):
        return
    if not _still_there(pidfd):
        return
    for first, last in mapped:
        into.add(first, last)


def pipes_written_by(pid: int, pipes: set[int], pidfd: int | None = None) -> set[int]:
    """Which of ``pipes`` (by inode) ``pid`` holds open for writing. The permission bits
    of a /proc/PID/fd link are its descriptor's open mode (``w``: open for writing). A
    process that is gone (or, with its ``pidfd``, whose pid was taken) holds none."""
    held: set[int] = set()
    where = f"/proc/{pid}/fd"
    try:
        names = os.listdir(where)
    except OSError:
        return held
    for name in names:
        try:
            link = os.readlink(f"{where}/{name}")
            if not link.startswith("pipe:[") or int(link[6:-1]) not in pipes:
                continue
            if os.lstat(f"{where}/{name}").st_mode & stat.S_IWUSR:
                held.add(int(link[6:-1]))
        except OSError:
            continue  # closed meanwhile
    return held if _still_there(pidfd) else set()


def _still_there(pidfd: int | None) -> bool:
    """Whether the process of ``pidfd`` is alive, after its /proc files were read: then the
    pid was its own all along (not taken by another process meanwhile). True without one."""
    if pidfd is None:
        return True
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    return True
