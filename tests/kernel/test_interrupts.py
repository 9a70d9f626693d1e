"""An exception from a signal handler (Ctrl-C's KeyboardInterrupt) between any two lines of
the hot paths of ``map`` and ``Mapping.close`` may leak a mapping or a count (an over-count
never frees a page), but never leaves the books naming memory the object does not map:
a later unmap would take whatever the kernel put there since (a segfault). And ``close``
still ends.

The interrupt is placed with a line trace, in turn at each line a signal handler can
reach: CPython runs handlers when a call returns (and on entry, and at a loop's jump
back), so at the start of each line that follows one making a call.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable
from types import CodeType
from typing import Any

import oracle
import pytest
from support import interrupt_at, reached

import devanon
from devanon import anon as anon_module
from devanon import mapper

PS = 4096


def _closes(anon: devanon.Anon) -> None:
    done = threading.Thread(target=anon.close, daemon=True)
    done.start()
    done.join(10)
    assert not done.is_alive(), "close() did not end"


def _targets(viewed: bool, *functions: Callable[..., Any]) -> list[tuple[Any, ...]]:
    """``(name, code, line, viewed)`` for each line of these functions that a signal
    handler can reach and that the scenario runs."""
    anon = devanon.Anon(64 * PS)
    try:
        found = reached(lambda: _scenario(anon, viewed), functions)
    finally:
        anon.close()
    return [(*target, viewed) for target in found]


HOT = (
    mapper.Mapper.map,
    mapper.Mapper._close_mapping,
    anon_module.Anon._map_counted,
    anon_module.Anon._lose_one,
)
VIEWED = (mapper.Mapper._close_mapping, mapper.Mapper._unmap_spans, mapper.Mapper._make_calls)


def _scenario(anon: devanon.Anon, viewed: bool) -> None:
    """Map a page, write it, close it (with a view of it held, if ``viewed``)."""
    views = []
    m = anon.map(PS, PS)
    ctypes.memset(m.address, 2, 1)
    if viewed:
        views.append(m.view())
    m.close()
    views.clear()


def _interrupted(anon: devanon.Anon, code: CodeType, line: int, viewed: bool) -> None:
    """The scenario, an interrupt at ``line`` of ``code``; then the books must be true, and
    stay so."""
    keep = anon.map(0, PS)
    ctypes.memset(keep.address, 1, 1)
    with interrupt_at(code, line) as fired, contextlib.suppress(KeyboardInterrupt):
        _scenario(anon, viewed)
    assert fired[0]
    assert oracle.stray_segments(anon) == []
    assert anon.stats().mappings == _owners(anon)
    assert ctypes.string_at(keep.address, 1) == b"\x01"  # the other mapping is untouched
    for _ in range(3):  # more maps and closes over the same addresses still work
        anon.map(PS, 2 * PS).close()
        assert oracle.stray_segments(anon) == []
        assert [seg._start for seg in anon._segments] == anon._starts  # in step again
        assert anon.stats().mappings == _owners(anon)


def _owners(anon: devanon.Anon) -> int:
    """The mappings the books hold a piece of (what ``stats().mappings`` must say)."""
    return len({id(seg._owner) for seg in anon._segments})


@pytest.mark.parametrize(
    ("name", "code", "line", "viewed"),
    _targets(False, *HOT) + _targets(True, *VIEWED),
)
def test_an_interrupt_in_map_or_close_leaves_the_books_true(
    name: str, code: CodeType, line: int, viewed: bool
) -> None:
    """``viewed``: the mapping closed has a live view (its piece is quarantined)."""
    anon = devanon.Anon(64 * PS)
    try:
        _interrupted(anon, code, line, viewed)
    finally:
        _closes(anon)
