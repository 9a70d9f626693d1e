"""Interrupts (a signal handler's exception) in overlays and in unmaps of several pieces:
as ``test_interrupts`` does for the hot paths, at every line a handler can reach."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from types import CodeType

import oracle
import pytest
from support import interrupt_at, overlay_scenario, reached
from test_interrupts import _closes

import devanon
from devanon import anon as anon_module
from devanon import mapper

PS = 4096
OVERLAY_FILE = Path("/dev/shm") / f"devanon-intr-overlay-{os.getpid()}"


def _scenario(anon: devanon.Anon, path: Path) -> None:
    overlay_scenario(anon, path, PS)


FUNCTIONS = (
    mapper.Mapper.overlay,
    mapper.Mapper._release_overlay,
    mapper.Mapper.unmap,
    mapper.Mapper._unmap_spans,
    mapper.Mapper._calls,
    mapper.Mapper._make_calls,
    mapper.Mapper._forget,
    mapper.Mapper._cut,
    mapper.Mapper._discard_overlay,
    mapper.Mapper._unlay,
    mapper.Mapper._close_mapping,
    anon_module.Anon._lose,
    anon_module.Anon._punch,
)


def _targets() -> list[tuple[str, CodeType, int]]:
    OVERLAY_FILE.write_bytes(b"o" * 2 * PS)
    anon = devanon.Anon(16 * PS)
    try:
        return reached(lambda: _scenario(anon, OVERLAY_FILE), FUNCTIONS)
    finally:
        anon.close()


@pytest.mark.parametrize(("name", "code", "line"), _targets())
def test_an_interrupt_in_an_overlay_or_a_pieced_unmap_leaves_the_books_true(
    name: str, code: CodeType, line: int
) -> None:
    OVERLAY_FILE.write_bytes(b"o" * 2 * PS)
    with open(OVERLAY_FILE, "rb") as f:
        ident = oracle.file_id(f.fileno())
    anon = devanon.Anon(16 * PS)
    try:
        keep = anon.map(0, PS)
        ctypes.memset(keep.address, 1, 1)
        with interrupt_at(code, line) as fired, contextlib.suppress(KeyboardInterrupt):
            _scenario(anon, OVERLAY_FILE)
        assert fired[0]
        assert oracle.stray_segments(anon, ident) == []
        assert ctypes.string_at(keep.address, 1) == b"\x01"
        for _ in range(3):
            with contextlib.suppress(ValueError):  # (what the books no longer hold)
                _scenario(anon, OVERLAY_FILE)
            assert oracle.stray_segments(anon, ident) == []
            assert [seg._start for seg in anon._segments] == anon._starts
    finally:
        _closes(anon)
