"""A UML-like guest: physical memory is one Anon; frames, a page cache, a ubd disk.

The guest does not run code: it replays recorded reads (a ``Plan``) the way a guest kernel
would serve them. A read looks each page up in the page cache; missing pages get frames
(contiguous ones for contiguous file data, next to the file's previous page where that
frame is free) and the block device fills them, in extents. The reader then consumes the
bytes (a CRC over them, through the guest memory, so the pages are really touched).

When the frames run out, least recently used pages are evicted, and their frames are given
back to the host at once (UML today keeps them: its memory file stays resident). The
guest's other memory (kernel, processes: ``guest_other_bytes``) is frames it writes.
"""

from __future__ import annotations

import os
import zlib
from array import array
from dataclasses import asdict, dataclass

from devanon.guest.frames import FrameAllocator, OutOfFrames
from devanon.guest.pagecache import PageCache
from devanon.guest.plan import Plan
from devanon.image import Manifest, Piece
from devanon.physmem import PhysicalMemory
from devanon.ubd import BlockDevice, Mode
from devanon.units import Block, Frame


@dataclass(slots=True)
class ReplayResult:
    """What a replay did, and a CRC-32 of every byte it read, in order."""

    reads: int = 0
    bytes_read: int = 0
    crc: int = 0
    page_hits: int = 0
    page_misses: int = 0
    pages_evicted: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Guest:
    """One guest: memory, frame allocator, page cache and block device."""

    def __init__(self, memory: PhysicalMemory, device: BlockDevice) -> None:
        self.memory = memory
        self.device = device
        self.page_size = memory.page_size
        self.frames = FrameAllocator(memory.frames)
        self.cache = PageCache(memory.frames)
        self.other: list[tuple[Frame, int]] = []
        self.stats = ReplayResult()
        self._file_ids: dict[str, int] = {}
        self._plan_ids: Plan | None = None  # whose file numbers _file_ids is, if a plan's

    @classmethod
    def create(
        cls,
        image: str | os.PathLike[str],
        mode: Mode | str,
        memory_bytes: int,
        *,
        cow: str | os.PathLike[str] | None = None,
        prefetch: bool = True,
        name: str = "guest",
    ) -> Guest:
        """A guest of ``memory_bytes`` booting ``image`` in ``mode``."""
        memory = PhysicalMemory(memory_bytes, name=name)
        try:
            device = BlockDevice(image, memory, mode, cow=cow, prefetch=prefetch)
        except BaseException:
            memory.close()
            raise
        return cls(memory, device)

    # -- the guest's own memory ------------------------------------------------------------

    def add_other_memory(self, nbytes: int) -> None:
        """Allocate and write ``nbytes`` (rounded up to pages) of non-disk memory."""
        pages = -(-nbytes // self.page_size)
        if pages == 0:
            return
        pattern = bytes(range(256)) * (self.page_size // 256) * 64
        for frame, n in self._alloc(pages, None):
            span = self.memory.span(frame, n)
            for at in range(0, len(span), len(pattern)):
                chunk = span[at : at + len(pattern)]
                chunk[:] = pattern[: len(chunk)]
            self.other.append((frame, n))

    def free_other_memory(self) -> None:
        """Free the non-disk memory (the frames go back to the host)."""
        for frame, n in self.other:
            self.device.release(frame, n)
            self.frames.free(frame, n)
        self.other.clear()

    # -- the page cache ----------------------------------------------------------------------

    def load(self, file: int, page: int, block: Block, count: int) -> None:
        """Cache pages ``[page, page+count)`` of ``file``, stored in blocks from ``block``."""
        cache = self.cache
        p, end = page, page + count
        while p < end:
            if cache.get(file, p) is not None:
                self.stats.page_hits += 1
                p += 1
                continue
            q = p + 1
            while q < end and cache.peek(file, q) is None:
                q += 1
            prev = cache.peek(file, p - 1) if p else None
            near = Frame(prev + 1) if prev is not None else None
            at = p
            for frame, n in self._alloc(q - p, near):
                self.device.read(frame, Block(block + (at - page)), n)
                cache.put(file, at, frame, n)
                at += n
            self.stats.page_misses += q - p
            p = q

    def consume(self, file: int, offset: int, length: int, crc: int = 0) -> int:
        """CRC-32 (continuing ``crc``) of cached bytes ``[offset, offset+length)`` of ``file``.

        Reading through the guest memory touches the pages, as a reader would.
        """
        ps = self.page_size
        end = offset + length
        pos = offset
        while pos < end:
            frame = self.cache.peek(file, pos // ps)
            if frame is None:
                raise ValueError(f"page {pos // ps} of file {file} is not cached")
            # extend over following pages held in following frames
            stop = min(end, (pos // ps + 1) * ps)
            while stop < end and self.cache.peek(file, stop // ps) == frame + (
                stop // ps - pos // ps
            ):
                stop = min(end, (stop // ps + 1) * ps)
            at = frame * ps + pos % ps
            crc = zlib.crc32(self.memory.view[at : at + (stop - pos)], crc)
            pos = stop
        return crc

    def drop_caches(self) -> int:
        """Evict every cached page (like ``echo 1 > drop_caches``); returns how many."""
        victims = self.cache.evict(len(self.cache))
        self._release([f for _, _, f in victims])
        self.stats.pages_evicted += len(victims)
        return len(victims)

    # -- reads and writes ----------------------------------------------------------------------

    def replay(self, plan: Plan) -> ReplayResult:
        """Do every read of ``plan`` in order; returns this replay's figures."""
        if plan.page_size != self.page_size:
            raise ValueError(
                f"the plan's block size {plan.page_size} is not the page size {self.page_size}"
            )
        before = ReplayResult(**asdict(self.stats))
        crc = 0
        if not self._file_ids and self._plan_ids is None:
            # Adopt the plan's file numbers: no walk over its paths (in a forked guest,
            # touching those shared strings would copy the pages holding them).
            self._file_ids, self._plan_ids = plan.ids, plan
        ids = None if self._plan_ids is plan else array("q", map(self.file_id, plan.paths))
        ppage, pblock, pcount, first = (
            plan.piece_page,
            plan.piece_block,
            plan.piece_count,
            plan.read_piece,
        )
        for i in range(plan.reads):
            fid = plan.read_file[i] if ids is None else ids[plan.read_file[i]]
            for k in range(first[i], first[i + 1]):
                self.load(fid, ppage[k], Block(pblock[k]), pcount[k])
            crc = self.consume(fid, plan.read_offset[i], plan.read_length[i], crc)
            self.stats.reads += 1
            self.stats.bytes_read += plan.read_length[i]
        self.stats.crc = crc
        return ReplayResult(
            reads=self.stats.reads - before.reads,
            bytes_read=self.stats.bytes_read - before.bytes_read,
            crc=crc,
            page_hits=self.stats.page_hits - before.page_hits,
            page_misses=self.stats.page_misses - before.page_misses,
            pages_evicted=self.stats.pages_evicted - before.pages_evicted,
        )

    def read(self, manifest: Manifest, path: str, offset: int, length: int) -> bytes:
        """Read ``length`` bytes of ``path`` from ``offset`` through the page cache."""
        fid, pieces = self._locate(manifest, path, offset, length)
        for piece in pieces:
            self.load(fid, piece.page, piece.block, piece.count)
        ps = self.page_size
        out = bytearray()
        for pos in range(offset - offset % ps, offset + length, ps):
            frame = self.cache.peek(fid, pos // ps)
            assert frame is not None
            lo, hi = max(pos, offset), min(pos + ps, offset + length)
            out += self.memory.view[frame * ps + lo - pos : frame * ps + hi - pos]
        return bytes(out)

    def write(self, manifest: Manifest, path: str, offset: int, data: bytes) -> None:
        """Write ``data`` into ``path`` at ``offset``: page cache, then the COW layer."""
        if not data:
            raise ValueError(f"nothing to write to {path!r}")
        fid, pieces = self._locate(manifest, path, offset, len(data))
        ps = self.page_size
        for piece in pieces:
            self.load(fid, piece.page, piece.block, piece.count)
        done = 0
        for piece in pieces:
            for i in range(piece.count):
                page = piece.page + i
                lo = max(offset + done, page * ps)
                hi = min(offset + len(data), (page + 1) * ps)
                if lo >= hi:
                    continue
                frame = self.cache.peek(fid, page)
                assert frame is not None
                self.device.write(
                    frame, Block(piece.block + i), data[lo - offset : hi - offset], lo - page * ps
                )
                done = hi - offset

    # -- internals -------------------------------------------------------------------------------

    def file_id(self, path: str) -> int:
        """The guest's number for ``path`` (page cache keys use it)."""
        fid = self._file_ids.get(path)
        if fid is None:
            if self._plan_ids is not None:  # the plan's dict is shared: copy before adding
                self._file_ids, self._plan_ids = dict(self._file_ids), None
            fid = self._file_ids[path] = len(self._file_ids)
        return fid

    def _locate(
        self, manifest: Manifest, path: str, offset: int, length: int
    ) -> tuple[int, list[Piece]]:
        if path not in manifest:
            raise FileNotFoundError(2, f"{path!r} is not in the image")
        size = manifest.entry(path).size
        if offset < 0 or length <= 0 or offset + length > size:
            raise ValueError(
                f"range [{offset}, {offset + length}) of {path!r} is outside the file "
                f"({size} bytes)"
            )
        ps = self.page_size
        first, last = offset // ps, -(-(offset + length) // ps)
        return self.file_id(path), manifest.pieces(path, first, last - first)

    def _alloc(self, count: int, near: Frame | None) -> list[tuple[Frame, int]]:
        """``count`` frames, evicting least recently used pages if the guest is full."""
        if count > self.frames.free_frames:
            # Exactly what is missing: any more could take pages that the read under way
            # loaded a moment ago (they are the most recently used, but may be all there is).
            victims = self.cache.evict(count - self.frames.free_frames)
            self._release([f for _, _, f in victims])
            self.stats.pages_evicted += len(victims)
        try:
            return self.frames.alloc(count, near=near)
        except OutOfFrames:
            raise OutOfFrames(
                f"guest memory is full: {count} frames wanted, {self.frames.free_frames} free "
                f"after evicting the page cache ({len(self.other)} runs of other memory)"
            ) from None

    def _release(self, frames: list[Frame]) -> None:
        """Give frames back to the host, coalesced into runs."""
        for frame, n in _runs(sorted(frames)):
            self.device.release(frame, n)
            self.frames.free(frame, n)

    def close(self) -> None:
        self.device.close()
        self.memory.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(frames: list[Frame]) -> list[tuple[Frame, int]]:
    out: list[tuple[Frame, int]] = []
    for f in frames:
        if out and out[-1][0] + out[-1][1] == f:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((f, 1))
    return out
