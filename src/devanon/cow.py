"""The copy-on-write layer: a guest's own file holding the blocks it wrote.

Like UML's ``ubd0=cow,base``: many guests boot one read-only base image, and each keeps
the blocks it changed in a COW file of its own; the base is never written. The file is

- page 0: a JSON header (format, version, block size, block count, the base image's path,
  size and modification time), padded with NULs;
- from page 1: a bitmap, one bit per block, set where the COW file holds the block;
- from ``data_offset`` (page-aligned): block ``b`` at ``data_offset + b * block_size``, a
  sparse file, so only written blocks take space and a block can be mapped as a page.

Data is written before its bit, so a crash leaves at worst a block that is not yet used.
"""

from __future__ import annotations

import json
import os

from devanon import _checks
from devanon.anon import PAGE_SIZE
from devanon.units import Block

COW_FORMAT = "devanon-cow"
COW_VERSION = 1


_HEADER_KEYS: dict[str, type | tuple[type, ...]] = {
    "block_size": int,
    "blocks": int,
    "base": str,
    "base_size": int,
}
"""What a header must hold, and of which type (``base_mtime_ns`` too, since devanon
0.1's second COW files: an older one names its base by size alone)."""


class CowLayer:
    """A COW file over a base image of ``blocks`` blocks; use ``create`` or ``open``."""

    def __init__(
        self, fd: int, path: str, blocks: int, block_size: int, bitmap: bytearray, base: str
    ) -> None:
        self.fd = fd
        self.path = path
        self.blocks = blocks
        self.block_size = block_size
        self.base = base
        self._bitmap = bitmap
        self.bitmap_offset = PAGE_SIZE
        self.data_offset = PAGE_SIZE + _round_up(len(bitmap), PAGE_SIZE)
        self.blocks_written = 0

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        base: str,
        base_size: int,
        block_size: int,
        base_mtime_ns: int = 0,
    ) -> CowLayer:
        """A new, empty COW file at ``path`` (which must not exist) over ``base``."""
        if base_size % block_size:
            raise ValueError(f"base size {base_size} is not a multiple of {block_size}")
        name = os.fspath(path)
        blocks = base_size // block_size
        header = json.dumps(
            {
                "format": COW_FORMAT,
                "version": COW_VERSION,
                "block_size": block_size,
                "blocks": blocks,
                "base": base,
                "base_size": base_size,
                "base_mtime_ns": base_mtime_ns,
            }
        ).encode()
        if len(header) >= PAGE_SIZE:
            raise ValueError(f"base path {base!r} is too long for a COW header")
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            bitmap = bytearray(-(-blocks // 8))
            layer = cls(fd, name, blocks, block_size, bitmap, base)
            os.pwrite(fd, header.ljust(PAGE_SIZE, b"\0"), 0)
            os.ftruncate(fd, layer.data_offset + base_size)
        except BaseException:
            os.close(fd)
            os.unlink(name)
            raise
        return layer

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        base_size: int,
        block_size: int,
        base_mtime_ns: int = 0,
    ) -> CowLayer:
        """An existing COW file; ``ValueError`` naming it if it is not one for this base and
        this block size (another size would map every block to the wrong bytes). The base
        is told by its size and modification time, as UML's COW header does (a base of
        the same size made or changed since would show through the COW file's holes)."""
        name = os.fspath(path)
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, PAGE_SIZE, 0).rstrip(b"\0")
            try:
                head = json.loads(raw)
                ok = head.get("format") == COW_FORMAT and head.get("version") == COW_VERSION
            except (ValueError, AttributeError):
                ok = False
            missing = [k for k, t in _HEADER_KEYS.items() if ok and not isinstance(head.get(k), t)]
            if not ok or missing:
                why = f" (its header lacks {', '.join(missing)})" if ok else ""
                raise ValueError(f"{name!r} is not a devanon COW file{why}")
            made_over = head.get("base_mtime_ns", base_mtime_ns)  # unknown: not refused
            if type(made_over) is not int:
                raise ValueError(
                    f"{name!r} is not a devanon COW file (base_mtime_ns {made_over!r})"
                )
            if made_over != base_mtime_ns:
                raise ValueError(
                    f"COW file {name!r} was made over a base modified at "
                    f"{made_over} ns, not {base_mtime_ns}: another image, or one "
                    "changed since (UML's 'backing file mismatch')"
                )
            if head["base_size"] != base_size:
                raise ValueError(
                    f"COW file {name!r} is for a base of {head['base_size']} bytes, not {base_size}"
                )
            blocks = int(head["blocks"])
            if int(head["block_size"]) != block_size or blocks * block_size != base_size:
                raise ValueError(
                    f"COW file {name!r} has {blocks} blocks of {head['block_size']} bytes, "
                    f"not blocks of {block_size} bytes over {base_size}"
                )
            nbytes = -(-blocks // 8)
            bitmap = bytearray(os.pread(fd, nbytes, PAGE_SIZE))
            if len(bitmap) < nbytes:  # cut short: no bitmap, no claim to any block
                raise ValueError(f"COW file {name!r} is truncated (its bitmap is cut short)")
            return cls(fd, name, blocks, block_size, bitmap, str(head["base"]))
        except BaseException:
            os.close(fd)
            raise

    def has(self, block: Block) -> bool:
        """True if the COW file holds ``block``."""
        self._check(block, 1)
        return bool(self._bitmap[block >> 3] & (1 << (block & 7)))

    def runs(self, block: Block, count: int) -> list[tuple[Block, int, bool]]:
        """``[block, block+count)`` cut into runs ``(first, n, in_cow)``."""
        self._check(block, count)
        out: list[tuple[Block, int, bool]] = []
        bm = self._bitmap
        for b in range(block, block + count):
            here = bool(bm[b >> 3] & (1 << (b & 7)))
            if out and out[-1][2] == here:
                first, n, _ = out[-1]
                out[-1] = (first, n + 1, here)
            else:
                out.append((Block(b), 1, here))
        return out

    def offset_of(self, block: Block) -> int:
        """Where ``block``'s data lives in the COW file."""
        return self.data_offset + block * self.block_size

    def write(self, block: Block, data: bytes | bytearray | memoryview) -> None:
        """Store whole blocks from ``block``: the data first, then their bits."""
        view = memoryview(data).cast("B")
        if len(view) % self.block_size:
            raise ValueError(f"COW writes are whole blocks, not {len(view)} bytes")
        count = len(view) // self.block_size
        self._check(block, count)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset_of(block) + done)
        bm = self._bitmap
        for b in range(block, block + count):
            if not bm[b >> 3] & (1 << (b & 7)):
                self.blocks_written += 1
            bm[b >> 3] |= 1 << (b & 7)
        lo, hi = block >> 3, ((block + count - 1) >> 3) + 1
        os.pwrite(self.fd, bytes(bm[lo:hi]), self.bitmap_offset + lo)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _check(self, block: int, count: int) -> None:
        closed = f"COW file {self.path!r}" if self.fd < 0 else None
        _checks.blocks(block, count, self.blocks, closed=closed, inside="the COW layer")

    def __enter__(self) -> CowLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to
