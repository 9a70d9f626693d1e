"""The guest's page cache: (file, page) -> frame, evicting the least recently used.

A guest's page cache is per-guest memory on the host (the figure ubd-mmap is judged by), so
it lives in flat numpy arrays rather than a dict of Python ints (about 100 bytes a page):

- per file, ``frame + 1`` for each page (0: not cached), grown as pages are cached;
- per frame, the file and page it holds and when it was last used (a tick).

The per-frame arrays live in private anonymous mappings of their own (not ``calloc``, which
zeroes by hand, touching every page, when it serves the request from a heap that has room),
so pages of them that no cached frame touches cost nothing. Eviction picks the smallest
ticks: exact LRU, paid for only when the guest is out of frames.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import numpy.typing as npt

from devanon.units import Frame

_I32 = npt.NDArray[np.int32]


def lazy_zeros(n: int, dtype: Any) -> npt.NDArray[Any]:
    """A zeroed array in a private anonymous mapping: pages cost only once written."""
    size = max(1, n * np.dtype(dtype).itemsize)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=dtype, count=n)


class PageCache:
    """Cached pages of up to ``frames`` frames."""

    def __init__(self, frames: int) -> None:
        if frames <= 0:
            raise ValueError(f"a page cache needs frames, not {frames}")
        self.frames = frames
        self._files: dict[int, _I32] = {}
        self._file_of = lazy_zeros(frames, np.int32)  # file + 1, 0 where not a cache page
        self._page_of = lazy_zeros(frames, np.int32)
        self._used = lazy_zeros(frames, np.uint64)
        self._tick = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def peek(self, file: int, page: int) -> Frame | None:
        """The frame holding the page, leaving the LRU order alone; None on a miss."""
        table = self._files.get(file)
        if table is None or page >= len(table):
            return None
        f = int(table[page]) - 1
        return None if f < 0 else Frame(f)

    def get(self, file: int, page: int) -> Frame | None:
        """The frame holding the page, now the most recently used; None on a miss."""
        frame = self.peek(file, page)
        if frame is not None:
            self._tick += 1
            self._used[frame] = self._tick
        return frame

    def put(self, file: int, page: int, frame: Frame) -> None:
        """Cache the page in ``frame`` (most recently used)."""
        if not 0 <= frame < self.frames:
            raise ValueError(f"frame {frame} is not one of the {self.frames} frames")
        if file < 0 or page < 0:
            raise ValueError(f"bad page ({file}, {page})")
        if self._file_of[frame]:
            raise ValueError(f"frame {frame} already holds a cached page")
        table = self._files.get(file)
        if table is None or page >= len(table):
            grown = np.zeros(max(16, 1 << (page + 1).bit_length()), np.int32)
            if table is not None:
                grown[: len(table)] = table
            table = self._files[file] = grown
        if table[page]:
            raise ValueError(f"page {page} of file {file} is already cached")
        table[page] = frame + 1
        self._file_of[frame] = file + 1
        self._page_of[frame] = page
        self._tick += 1
        self._used[frame] = self._tick
        self._count += 1

    def pop(self, file: int, page: int) -> Frame | None:
        """Remove the page; its frame, or None if it was not cached."""
        frame = self.peek(file, page)
        if frame is not None:
            self._forget(frame)
        return frame

    def evict(self, count: int) -> list[tuple[int, int, Frame]]:
        """Remove up to ``count`` least recently used pages: ``(file, page, frame)``."""
        held = np.flatnonzero(self._file_of)
        if count <= 0 or len(held) == 0:
            return []
        if count < len(held):
            held = held[np.argpartition(self._used[held], count - 1)[:count]]
        held = held[np.argsort(self._used[held], kind="stable")]
        out = [(int(self._file_of[f]) - 1, int(self._page_of[f]), Frame(int(f))) for f in held]
        for _, _, frame in out:
            self._forget(frame)
        return out

    def items(self) -> list[tuple[int, int, Frame]]:
        """Every cached ``(file, page, frame)``, least recently used first."""
        held = np.flatnonzero(self._file_of)
        held = held[np.argsort(self._used[held], kind="stable")]
        return [(int(self._file_of[f]) - 1, int(self._page_of[f]), Frame(int(f))) for f in held]

    def _forget(self, frame: Frame) -> None:
        file = int(self._file_of[frame]) - 1
        self._files[file][self._page_of[frame]] = 0
        self._file_of[frame] = 0
        self._page_of[frame] = 0
        self._used[frame] = 0
        self._count -= 1
