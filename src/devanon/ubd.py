"""ubd: a block device over a disk image that fills guest frames, in one of two modes.

- ``copy`` (what UML does today): ``preadv`` the blocks into the guest frames. The host then
  holds the data twice: in the image's page cache and in the guest's memory.
- ``mmap`` (ubd-mmap, the RFC's point): map the image's pages read-only over the guest
  frames (``PhysicalMemory.overlay``); the Anon pages under them are punched. The host holds
  the data once, in the image's page cache, shared by every guest that boots the image.

Both modes read exactly the blocks asked for: ``POSIX_FADV_RANDOM`` on the image in copy
mode, ``MADV_RANDOM`` on each overlay in mmap mode (readahead otherwise pulls in far more
than was read, in either mode, and decides the result). Reads come in extents (runs of
contiguous frames holding contiguous blocks), one syscall or one mapping each.

The write path, the part UML dropped in 2005: writes need a copy-on-write layer (a file of
the guest's own, ``CowLayer``), never the base image, so many guests share one base. A
write to overlaid frames first breaks the sharing (``PhysicalMemory.unshare``), then the
frames are written and their whole blocks stored in the COW layer. In mmap mode the frames
are then mapped from the COW file (one copy again). Reads of blocks the COW layer holds come
from it.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from devanon import _checks
from devanon.cow import CowLayer
from devanon.physmem import PhysicalMemory
from devanon.units import Block, Frame


class Mode(enum.Enum):
    """How the device fills guest frames."""

    COPY = "copy"
    MMAP = "mmap"

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        """A mode from its name; ``ValueError`` naming the value otherwise."""
        if isinstance(value, Mode):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"mode must be 'copy' or 'mmap', not {value!r}") from None


@dataclass(slots=True)
class UbdStats:
    """What the device did."""

    blocks_read: int = 0
    """Blocks filled into frames (from the base or the COW layer)."""
    read_calls: int = 0
    """preadv calls (copy) or overlays (mmap)."""
    cow_blocks_read: int = 0
    blocks_written: int = 0
    unshared_frames: int = 0


class BlockDevice:
    """A disk image (read-only) plus an optional COW layer, filling one guest's frames."""

    def __init__(
        self,
        image: str | os.PathLike[str],
        memory: PhysicalMemory,
        mode: Mode | str,
        *,
        cow: str | os.PathLike[str] | None = None,
        prefetch: bool = True,
    ) -> None:
        self.mode = Mode.parse(mode)
        self.image = os.fspath(image)
        self.memory = memory
        self.prefetch = prefetch
        self.block_size = memory.page_size
        self.stats = UbdStats()
        try:
            self.fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(2, f"disk image {self.image!r} does not exist") from None
        try:
            st = os.fstat(self.fd)
            size = st.st_size
            if size % self.block_size:
                raise ValueError(
                    f"image {self.image!r} is {size} bytes, not a multiple of the block size "
                    f"{self.block_size}"
                )
            self.blocks = size // self.block_size
            if self.mode is Mode.COPY:
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            self.cow: CowLayer | None = None
            if cow is not None:
                if os.path.exists(cow):
                    self.cow = CowLayer.open(cow, size, self.block_size, st.st_mtime_ns)
                else:
                    self.cow = CowLayer.create(
                        cow, self.image, size, self.block_size, st.st_mtime_ns
                    )
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, frame: Frame, block: Block, count: int) -> None:
        """Fill frames ``[frame, frame+count)`` with blocks ``[block, block+count)``."""
        self._check(block, count)
        self.memory.span(frame, count)  # checks the frames
        runs = [(block, count, False)] if self.cow is None else self.cow.runs(block, count)
        for first, n, in_cow in runs:
            f = Frame(frame + (first - block))
            if in_cow:
                assert self.cow is not None
                self._fill(f, n, self.cow.fd, self.cow.offset_of(first))
                self.stats.cow_blocks_read += n
            else:
                self._fill(f, n, self.fd, first * self.block_size)
            self.stats.blocks_read += n

    def write(self, frame: Frame, block: Block, data: bytes | memoryview, skip: int = 0) -> None:
        """The guest writes ``data`` at byte ``skip`` of the frames that hold ``block``...

        The frames must already hold those blocks (the guest reads before a partial write,
        as a page cache does). Sharing is broken first; the whole blocks written then go to
        the COW layer, never to the base image.
        """
        if self.cow is None:
            raise ValueError(f"{self.image!r} is attached read-only: give a COW file to write")
        if skip < 0 or not data:
            raise ValueError(f"nothing to write (skip {skip}, {len(data)} bytes)")
        count = -(-(skip + len(data)) // self.block_size)
        self._check(block, count)
        before = self.memory.unshared_frames
        self.memory.unshare(frame, count)
        self.stats.unshared_frames += self.memory.unshared_frames - before
        span = self.memory.span(frame, count)
        span[skip : skip + len(data)] = data
        self.cow.write(block, span)
        self.stats.blocks_written += count
        if self.mode is Mode.MMAP:
            # The COW file's page cache now holds the blocks: map them, drop the Anon copy.
            self.memory.overlay(frame, count, self.cow.fd, self.cow.offset_of(block))

    def release(self, frame: Frame, count: int) -> None:
        """The guest freed these frames: give them back to the host at once."""
        self.memory.discard(frame, count)

    def _fill(self, frame: Frame, count: int, fd: int, offset: int) -> None:
        self.stats.read_calls += 1
        if self.mode is Mode.MMAP:
            self.memory.overlay(frame, count, fd, offset, prefetch=self.prefetch)
            return
        span = self.memory.span(frame, count)
        done = 0
        while done < len(span):
            n = os.preadv(fd, [span[done:]], offset + done)
            if n <= 0:
                raise OSError(5, f"short read of {self.image!r} at {offset + done:#x}")
            done += n

    def _check(self, block: int, count: int) -> None:
        closed = f"block device over {self.image!r}" if self.fd < 0 else None
        _checks.blocks(block, count, self.blocks, closed=closed, inside=repr(self.image))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.cow is not None:
            self.cow.close()

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
