"""The only module that calls C: the syscalls Python's ``os`` and ``mmap`` lack.

The calls go through cffi (ABI mode, out of line: ``_cdefs``, written by
``scripts/build_cdefs.py``), whose call costs a third of ctypes' (0.47 against 1.35 us for a
failing fallocate on this machine; each map and unmap makes two or three calls, against a
budget of about 10 us of Python). ctypes stays for what it does best: a buffer over raw
memory (``memory_at``, what views export) and ``copy``.

Every function checks the result and raises ``OSError(errno, message)`` naming the call and
its arguments, except the three ``*_status`` ones: the C functions themselves, for the hot
paths of map and unmap (where one more Python call costs a measurable share of a 4 KiB
cycle). Their callers compare the result with ``MAP_FAILED`` or 0 and raise ``mmap_error``,
``munmap_error`` or ``error``.

Some facts about the calls (the code above only makes sense once you know them):

- ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` is today's sys_punch: tmpfs since 3.5, hugetlbfs
  since 4.3, ext4/xfs/btrfs. ``madvise(MADV_DONTNEED)`` does *not* free a page of a
  ``MAP_SHARED`` file mapping (Firecracker #6167); ``MADV_REMOVE`` does, and is itself a
  punch done through a mapping.
- ``mmap(MAP_FIXED)`` silently replaces whatever was mapped at the address, which is why
  devanon only ever places a mapping over memory it already owns.
- A failed ``munmap`` or ``mmap`` (ENOMEM once a process holds ``vm.max_map_count``
  mappings) leaves the old mappings in place on the kernels we support; callers update
  their books only after a call succeeded.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any, Final

from devanon._cdefs import ffi as _ffi

PROT_NONE: Final = 0
PROT_READ: Final = 1
PROT_WRITE: Final = 2

MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
MAP_NORESERVE: Final = 0x4000

MADV_RANDOM: Final = 1
MADV_WILLNEED: Final = 3
MADV_REMOVE: Final = 9
MADV_DONTFORK: Final = 10
MADV_DOFORK: Final = 11

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

_c: Any = _ffi.dlopen(None)  # the C library this process has loaded already
MAP_FAILED: Final = int(_ffi.cast("uintptr_t", -1))

mmap_status = _c.mmap
"""mmap(2) as C has it: the address, or ``MAP_FAILED`` (then raise ``mmap_error``)."""
munmap_status = _c.munmap
"""munmap(2) as C has it: 0, or -1 (then raise ``munmap_error``)."""
_madvise = _c.madvise
fallocate_status = _c.fallocate64
"""fallocate(2) as C has it: 0, or -1 (then raise ``error``, or, as ``punch.punch_one``,
take the way that explains)."""
_mincore = _c.mincore
_getsockopt = _c.getsockopt
_memmove = ctypes.memmove


def error(call: str) -> OSError:
    """The OSError of the C call that just failed in this thread (its errno), naming it."""
    err = _ffi.errno
    return OSError(err, f"{call}: {os.strerror(err)}")


def mmap_error(address: int, length: int, prot: int, flags: int, fd: int, offset: int) -> OSError:
    """``error`` of an mmap that just failed, its arguments named."""
    return error(
        f"mmap(address={address:#x}, length={length:#x}, prot={prot:#x}, "
        f"flags={flags:#x}, fd={fd}, offset={offset:#x})"
    )


def munmap_error(address: int, length: int) -> OSError:
    """``error`` of a munmap that just failed, its arguments named."""
    return error(f"munmap(address={address:#x}, length={length:#x})")


def mmap(address: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """mmap(2); returns the address of the new mapping."""
    result: int = mmap_status(address, length, prot, flags, fd, offset)
    if result == MAP_FAILED:
        raise mmap_error(address, length, prot, flags, fd, offset)
    return result


def munmap(address: int, length: int) -> None:
    """munmap(2)."""
    if munmap_status(address, length) != 0:
        raise munmap_error(address, length)


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2)."""
    if _madvise(address, length, advice) != 0:
        raise error(f"madvise(address={address:#x}, length={length:#x}, advice={advice})")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2)."""
    if fallocate_status(fd, mode, offset, length) != 0:
        raise error(f"fallocate(fd={fd}, mode={mode:#x}, offset={offset:#x}, length={length:#x})")


PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
"""fallocate(2)'s mode that frees a range and keeps the file's size: a punch."""


def getsockopt(fd: int, level: int, option: int, room: int) -> tuple[bytes, int]:
    """getsockopt(2) with ``room`` bytes for the value (``socket.getsockopt`` takes at most
    1,024): ``(value, 0)``, or ``(b"", needed)`` where the kernel answers ERANGE and says
    how many bytes it needs."""
    out = _ffi.new("char[]", room)
    size = _ffi.new("uint32_t *", room)
    if _getsockopt(fd, level, option, out, size) == 0:
        value: bytes = _ffi.buffer(out, min(size[0], room))[:]
        return value, 0
    if _ffi.errno == errno.ERANGE and size[0] > room:
        return b"", size[0]
    raise error(f"getsockopt(fd={fd}, level={level}, option={option}, room={room})")


def mincore(address: int, length: int, page_size: int) -> bytes:
    """mincore(2): one byte per page, bit 0 set where the page is resident."""
    out = _ffi.new("unsigned char[]", (length + page_size - 1) // page_size)
    if _mincore(address, length, out) != 0:
        raise error(f"mincore(address={address:#x}, length={length:#x})")
    vec: bytes = _ffi.buffer(out)[:]
    return vec


def memory_at(address: int, length: int) -> ctypes.Array[ctypes.c_ubyte]:
    """A ctypes array over raw memory; its buffer is what ``Mapping.view()`` exports.

    The array object is what views keep alive (a memoryview holds its exporter), so a weak
    reference to it tells when the last view of that memory is gone.
    """
    return (ctypes.c_ubyte * length).from_address(address)


def copy(dst: int, src: int, length: int) -> None:
    """memmove between two addresses of this process."""
    _memmove(dst, src, length)
