"""src/devanon/_cdefs.py declares what scripts/build_cdefs.py declares, type for type."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cffi

import devanon._cdefs

BUILDER = Path(__file__).resolve().parents[2] / "scripts" / "build_cdefs.py"


def _functions(ffi: cffi.FFI) -> dict[str, str]:
    """Each C function an FFI declares, by name: its type as C spells it."""
    lib = ffi.dlopen(None)
    return {name: ffi.typeof(getattr(lib, name)).cname for name in dir(lib)}


def test_the_committed_module_matches_the_declarations() -> None:
    """Compared as declarations, not as text: another cffi writes other bytes for the same
    ones. Out of date: run scripts/build_cdefs.py."""
    spec = importlib.util.spec_from_file_location("build_cdefs", BUILDER)
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    declared = cffi.FFI()
    declared.cdef(builder.DECLARATIONS)
    committed = _functions(devanon._cdefs.ffi)
    assert committed == _functions(declared)
    assert committed["munmap"] == "int(*)(uintptr_t, size_t)"  # (the comparison compares)
