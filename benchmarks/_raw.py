"""The raw calls of the baselines: mmap, munmap and fallocate through ctypes.

This is what a Python program does without devanon (the standard library's way to the
calls ``os`` lacks), and the baseline the issue sets for core.py (a). Bound as devanon bound
them before it moved to cffi: ``argtypes``/``restype`` set, each result checked by a thin
Python wrapper that raises OSError.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_c = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_mmap = _c.mmap
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_mmap.restype = ctypes.c_void_p
_munmap = _c.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_fallocate = _c.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


def _fail(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def mmap(address: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """mmap(2) through ctypes."""
    result = _mmap(address or None, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        raise _fail("mmap")
    return int(result)


def munmap(address: int, length: int) -> None:
    """munmap(2) through ctypes."""
    if _munmap(address, length) != 0:
        raise _fail("munmap")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) through ctypes."""
    if _fallocate(fd, mode, offset, length) != 0:
        raise _fail("fallocate")
