"""The kernel's view of a file, for tests: never devanon's own counters.

- ``maps_counts``: how many of this process's VMAs (``/proc/self/maps``) show each page of
  the file. The kernel merges neighbouring VMAs of one file with contiguous offsets, but a
  VMA never shows one file page twice, so "VMAs covering the page" is exactly "times the
  page is mapped" (DESIGN invariant 3, for one process).
- ``data_pages``: the pages the file holds, from ``lseek(SEEK_DATA / SEEK_HOLE)``. A hole
  reads zeros through ``pread`` without being filled; a *read fault* on a shmem hole through
  a mapping allocates a page, so tests read unwritten pages with ``os.pread`` only.
- ``resident_bytes``: ``st_blocks * 512``, what the filesystem says the file holds.
- ``stray_segments``: what an object's books name that ``/proc/self/maps`` does not show
  as its file's (or, under an overlay, the overlay file's).

Exact page-for-page equality with a model needs shmem to allocate single pages, not large
folios (a write would then fill a whole 16 KiB..2 MiB folio): ``shmem_small_folios`` says
whether this host's THP settings guarantee that.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from support import data_pages as data_pages  # the tests call oracle.data_pages


def file_id(fd: int) -> tuple[int, int, int]:
    """``(major, minor, inode)`` of an open file, as ``/proc/PID/maps`` spells them."""
    st = os.fstat(fd)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def maps_entries(
    ident: tuple[int, int, int], pid: int | str = "self"
) -> list[tuple[int, int, int]]:
    """``(start, end, file_offset)`` of each VMA of ``pid`` that maps the file ``ident``."""
    major, minor, inode = ident
    out = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            # start-end perms offset dev inode [path]; dev is hex "major:minor".
            fields = line.split(maxsplit=5)
            if int(fields[4]) != inode:
                continue
            dev_major, dev_minor = (int(x, 16) for x in fields[3].split(":"))
            if (dev_major, dev_minor) != (major, minor):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, int(fields[2], 16)))
    return out


def maps_counts(fd: int, page_size: int, pid: int | str = "self") -> dict[int, int]:
    """Page index -> how many VMAs of ``pid`` map that page of ``fd``'s file (no zeros)."""
    counts: dict[int, int] = {}
    for start, end, offset in maps_entries(file_id(fd), pid):
        first = offset // page_size
        for page in range(first, first + (end - start) // page_size):
            counts[page] = counts.get(page, 0) + 1
    return counts


def resident_bytes(fd: int) -> int:
    """What the filesystem holds for the file: ``st_blocks`` (512-byte units) in bytes."""
    return os.fstat(fd).st_blocks * 512


def resident_pages(fd: int, page_size: int) -> int:
    """``resident_bytes`` in pages (rounded up)."""
    return -(-resident_bytes(fd) // page_size)


def shmem_small_folios() -> bool:
    """True if shmem (memfd, tmpfs) allocates only single pages on this host's settings."""
    base = "/sys/kernel/mm/transparent_hugepage"

    def chosen(path: str) -> str:
        try:
            with open(path, encoding="ascii") as f:
                text = f.read()
        except OSError:
            return "never"
        return text[text.index("[") + 1 : text.index("]")] if "[" in text else "never"

    top = chosen(f"{base}/shmem_enabled")
    for path in glob.glob(f"{base}/hugepages-*/shmem_enabled"):
        setting = chosen(path)
        if setting == "inherit":
            setting = top
        if setting not in ("never", "deny"):
            return False
    return top in ("never", "deny")


def stray_segments(mapper: Any, overlay_ident: tuple[int, int, int] | None = None) -> list[str]:
    """The ranges an Anon's or SharedAnon's books name that the kernel does not show as
    theirs: a range is to be a mapping of the object's file, or, where the books say an
    overlay lies, of that file too (``overlay_ident``; interrupted before its mmap, it is
    still the object's). A stray range could be writable over a read-only file in a view
    (SIGSEGV), or an unmap would take what the kernel put there since."""
    own = maps_entries(file_id(mapper.fd))
    laid = own + (maps_entries(overlay_ident) if overlay_ident is not None else [])
    return [
        f"{seg._start:#x}-{seg._stop:#x}"
        for seg in mapper._segments
        if not any(
            a <= seg._start and seg._stop <= b
            for a, b, _ in (own if seg._overlay is None else laid)
        )
    ]
