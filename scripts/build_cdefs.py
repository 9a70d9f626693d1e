"""Write src/devanon/_cdefs.py: cffi's out-of-line ABI module for the C calls of _libc.

Run it after changing ``DECLARATIONS`` (``tests/unit/test_cdefs.py`` fails until then)::

    .venv/bin/python scripts/build_cdefs.py

Out-of-line, so that importing devanon does not parse C (pycparser: 80 ms at every start,
against 3 ms for the module this writes). ABI mode: no compiler, the calls resolve in the C
library the process already has. Addresses are ``uintptr_t``, passed in the same registers
as a pointer on Linux's ABIs: cffi then takes and returns them as plain ints, no cast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cffi

DECLARATIONS = """
uintptr_t mmap(uintptr_t addr, size_t length, int prot, int flags, int fd, int64_t offset);
int munmap(uintptr_t addr, size_t length);
int madvise(uintptr_t addr, size_t length, int advice);
int fallocate64(int fd, int mode, int64_t offset, int64_t length);
int mincore(uintptr_t addr, size_t length, unsigned char *vec);
int getsockopt(int fd, int level, int option, void *value, uint32_t *length);
"""

TARGET = Path(__file__).resolve().parent.parent / "src" / "devanon" / "_cdefs.py"


def build(target: Path = TARGET) -> Path:
    """Write the module to ``target`` (its name is devanon._cdefs wherever it goes)."""
    ffi = cffi.FFI()
    ffi.cdef(DECLARATIONS)
    ffi.set_source("devanon._cdefs", None)
    ffi.emit_python_code(str(target))
    return target


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET)
