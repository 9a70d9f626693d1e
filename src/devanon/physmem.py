"""A guest's physical memory: one Anon, mapped once, in frames.

The one place where frames turn into host addresses and Anon offsets. Besides reading and
writing frames it does the three things ubd-mmap needs of the memory:

- ``overlay``: map a file's pages read-only over frames (``Anon.overlay``); the Anon pages
  under them lose their only count and are punched. Each overlay gets ``MADV_RANDOM`` (the
  same flags every time, so neighbouring overlays of one file still merge into one VMA):
  without it a fault reads around the faulting page, and with this machine's 8 MiB
  ``read_ahead_kb`` an 18 MiB boot pulls ~100 MiB into the page cache. ``MADV_WILLNEED``
  on exactly the overlaid range then starts the reads at once (DESIGN.md, "Lessons").
- ``discard``: give frames back to the host while the guest's mapping stays: the Anon has
  no call for "free the pages under a live mapping", so an empty memfd is overlaid on them
  (their count falls to zero, they are punched) and released at once (the Anon is mapped
  back, reading zeros, costing nothing until written).
- ``unshare``: break sharing before a write: the overlaid bytes are copied into the Anon
  pages, mapped back in place.
"""

from __future__ import annotations

import mmap
import os

from devanon import _libc
from devanon.anon import Anon
from devanon.units import Address, Frame, Offset


class PhysicalMemory:
    """``size`` bytes of guest memory (a multiple of the page size), zero-filled."""

    def __init__(self, size: int, *, name: str = "guest") -> None:
        self.anon = Anon(size, name=name)
        try:
            self.page_size = self.anon.page_size
            self.size = size
            self.frames = size // self.page_size
            self._mapping = self.anon.map(0, size)
            self.base = Address(self._mapping.address)
            self.view = self._mapping.view()
            # one byte a frame, in a mapping of its own: untouched pages cost nothing
            self._overlaid = mmap.mmap(-1, self.frames, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._hole = os.memfd_create(f"{name}-hole", os.MFD_CLOEXEC)
            os.ftruncate(self._hole, size)
        except BaseException:
            self.anon.close()
            raise
        self.overlay_calls = 0
        self.discard_calls = 0
        self.unshared_frames = 0

    # -- conversions (the only ones) ----------------------------------------------------

    def address(self, frame: Frame) -> Address:
        """Where ``frame`` is in this process."""
        return Address(self.base + frame * self.page_size)

    def offset(self, frame: Frame) -> Offset:
        """The Anon offset (guest physical address) of ``frame``."""
        return Offset(frame * self.page_size)

    def span(self, frame: Frame, count: int) -> memoryview:
        """The bytes of frames ``[frame, frame+count)``."""
        self._check(frame, count)
        return self.view[frame * self.page_size : (frame + count) * self.page_size]

    # -- ubd-mmap -----------------------------------------------------------------------

    def overlay(
        self, frame: Frame, count: int, fd: int, file_offset: int, *, prefetch: bool = True
    ) -> None:
        """Map ``count`` pages of the file ``fd`` from ``file_offset`` over the frames."""
        self._check(frame, count)
        address, length = self.address(frame), count * self.page_size
        # ``view`` is writable and stays alive: nothing writes an overlaid frame through it
        # (``unshare`` first), so a read-only overlay may lie under it.
        self.anon.overlay(address, fd, file_offset, length, under_writable_views=True)
        self.overlay_calls += 1
        self._overlaid[frame : frame + count] = b"\1" * count
        _libc.madvise(address, length, _libc.MADV_RANDOM)
        if prefetch:
            _libc.madvise(address, length, _libc.MADV_WILLNEED)

    def is_overlaid(self, frame: Frame) -> bool:
        """True if a file's page is mapped over ``frame``."""
        self._check(frame, 1)
        return bool(self._overlaid[frame])

    def discard(self, frame: Frame, count: int) -> None:
        """Give the frames back to the host: afterwards they read zeros and cost nothing."""
        self._check(frame, count)
        self.anon.overlay(
            self.address(frame), self._hole, 0, count * self.page_size, under_writable_views=True
        ).release()
        self.discard_calls += 1
        self._overlaid[frame : frame + count] = bytes(count)

    def unshare(self, frame: Frame, count: int) -> None:
        """Copy the overlaid frames among ``[frame, frame+count)`` into Anon pages of their own."""
        self._check(frame, count)
        f: int = frame
        while f < frame + count:
            if not self._overlaid[f]:
                f += 1
                continue
            end: int = f
            while end < frame + count and self._overlaid[end]:
                end += 1
            data = bytes(self.span(Frame(f), end - f))
            self.discard(Frame(f), end - f)
            self.span(Frame(f), end - f)[:] = data
            self.unshared_frames += end - f
            f = end

    # -- the kernel's view ----------------------------------------------------------------

    def vmas(self) -> int:
        """How many VMAs (``/proc/self/maps`` lines) make up the guest memory now."""
        lo, hi = self.base, self.base + self.size
        n = 0
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                start, _, rest = line.partition("-")
                end = rest.split(" ", 1)[0]
                if int(start, 16) < hi and int(end, 16) > lo:
                    n += 1
        return n

    def resident_bytes(self) -> int:
        """What the Anon's file holds (``st_blocks``): the guest's own pages on the host."""
        return self.anon.resident_bytes()

    def close(self) -> None:
        """Unmap everything and free the memory."""
        if self._hole < 0:
            return
        self.view.release()
        self.anon.close()
        self._overlaid.close()
        os.close(self._hole)
        self._hole = -1

    def __enter__(self) -> PhysicalMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, frame: int, count: int) -> None:
        if self._hole < 0:
            raise ValueError("guest memory is closed")
        if frame < 0 or count <= 0 or frame + count > self.frames:
            raise ValueError(
                f"frames [{frame}, {frame + count}) are outside guest memory ({self.frames} frames)"
            )
