"""The guest's page cache: (file, page) -> frame, evicting the least recently used.

A guest's page cache is per-guest memory on the host (the figure ubd-mmap is judged by), so
it lives in flat arrays rather than a dict of Python ints (about 100 bytes a page):

- per file, ``frame + 1`` for each page (0: not cached), grown as pages are cached;
- per frame, the file and page it holds and when it was last used (a tick).

The per-frame arrays live in private anonymous mappings of their own (not ``calloc``, which
zeroes by hand, touching every page, when it serves the request from a heap that has room),
so pages of them that no cached frame touches cost nothing. Eviction picks the smallest
ticks: exact LRU, paid for only when the guest is out of frames.
"""

from __future__ import annotations

import mmap
from array import array
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from devanon.units import Frame


def lazy_zeros(n: int, fmt: Literal["i", "Q"]) -> tuple[memoryview, npt.NDArray[Any]]:
    """``n`` zeros of struct format ``fmt`` in a private anonymous mapping (pages cost only
    once written), as a memoryview (fast single items) and a numpy array (bulk work)."""
    size = max(1, n * array(fmt).itemsize)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return memoryview(buf).cast(fmt)[:n], np.frombuffer(buf, dtype=np.dtype(fmt), count=n)


class PageCache:
    """Cached pages of up to ``frames`` frames."""

    def __init__(self, frames: int) -> None:
        if frames <= 0:
            raise ValueError(f"a page cache needs frames, not {frames}")
        self.frames = frames
        self._files: dict[int, array[int]] = {}  # per file: frame + 1 per page, 0: not cached
        # per frame: file + 1 (0: not a cache page), page, last use; numpy views for the
        # bulk work of eviction, memoryviews for fast single items
        self._file_of, self._np_file = lazy_zeros(frames, "i")
        self._page_of, self._np_page = lazy_zeros(frames, "i")
        self._used, self._np_used = lazy_zeros(frames, "Q")
        self._tick = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def peek(self, file: int, page: int) -> Frame | None:
        """The frame holding the page, leaving the LRU order alone; None on a miss."""
        table = self._files.get(file)
        if table is None or page >= len(table):
            return None
        f = table[page] - 1
        return None if f < 0 else Frame(f)

    def get(self, file: int, page: int) -> Frame | None:
        """The frame holding the page, now the most recently used; None on a miss."""
        frame = self.peek(file, page)
        if frame is not None:
            self._tick += 1
            self._used[frame] = self._tick
        return frame

    def put(self, file: int, page: int, frame: Frame, count: int = 1) -> None:
        """Cache pages ``[page, page+count)`` of ``file`` in frames from ``frame`` (most
        recently used, in that order)."""
        if count <= 0 or not (frame >= 0 and frame + count <= self.frames):
            raise ValueError(f"frames [{frame}, {frame + count}) are not among the {self.frames}")
        if file < 0 or page < 0 or file >= 1 << 31 or page + count >= 1 << 31:
            raise ValueError(f"bad page ({file}, {page})")
        if any(self._file_of[frame : frame + count]):
            raise ValueError(f"a frame of [{frame}, {frame + count}) already holds a cached page")
        table = self._files.get(file)
        if table is None:
            table = self._files[file] = array("i")
        if len(table) < page + count:
            table.extend(bytes(4 * (max(16, 2 * (page + count)) - len(table))))
            del table[max(16, 2 * (page + count)) :]
        if any(table[page : page + count]):
            raise ValueError(f"a page of [{page}, {page + count}) of file {file} is cached")
        table[page : page + count] = array("i", range(frame + 1, frame + count + 1))
        self._file_of[frame : frame + count] = array("i", [file + 1]) * count
        self._page_of[frame : frame + count] = array("i", range(page, page + count))
        self._used[frame : frame + count] = array(
            "Q", range(self._tick + 1, self._tick + count + 1)
        )
        self._tick += count
        self._count += count

    def pop(self, file: int, page: int) -> Frame | None:
        """Remove the page; its frame, or None if it was not cached."""
        frame = self.peek(file, page)
        if frame is not None:
            self._forget(frame)
        return frame

    def evict(self, count: int) -> list[tuple[int, int, Frame]]:
        """Remove up to ``count`` least recently used pages: ``(file, page, frame)``."""
        held = np.flatnonzero(self._np_file)
        if count <= 0 or len(held) == 0:
            return []
        if count < len(held):
            held = held[np.argpartition(self._np_used[held], count - 1)[:count]]
        held = held[np.argsort(self._np_used[held], kind="stable")]
        out = [(self._file_of[f] - 1, self._page_of[f], Frame(int(f))) for f in held]
        for _, _, frame in out:
            self._forget(frame)
        return out

    def items(self) -> list[tuple[int, int, Frame]]:
        """Every cached ``(file, page, frame)``, least recently used first."""
        held = np.flatnonzero(self._np_file)
        held = held[np.argsort(self._np_used[held], kind="stable")]
        return [(self._file_of[f] - 1, self._page_of[f], Frame(int(f))) for f in held]

    def _forget(self, frame: Frame) -> None:
        file = self._file_of[frame] - 1
        self._files[file][self._page_of[frame]] = 0
        self._file_of[frame] = 0
        self._page_of[frame] = 0
        self._used[frame] = 0
        self._count -= 1
