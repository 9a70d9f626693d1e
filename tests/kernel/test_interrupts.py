"""An exception from a signal handler (Ctrl-C's KeyboardInterrupt) between any two lines of
the hot paths of ``map`` and ``Mapping.close`` (and of a map placed with ``address=``) may
leak a mapping or a count (an over-count never frees a page), but never leaves a page
counted fewer times than it is mapped, nor the books naming memory the object does not map:
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
    _never_under(anon)
    assert ctypes.string_at(keep.address, 1) == b"\x01"  # the other mapping is untouched
    for _ in range(3):  # more maps and closes over the same addresses still work
        anon.map(PS, 2 * PS).close()
        assert oracle.stray_segments(anon) == []
        assert [seg._start for seg in anon._segments] == anon._starts  # in step again
        assert anon.stats().mappings == _owners(anon)


def _never_under(anon: devanon.Anon) -> None:
    """No page's count is below what ``/proc/self/maps`` shows (an under-count would free
    a mapped page; an over-count only keeps one)."""
    for page, mapped in oracle.maps_counts(anon.fd, PS).items():
        assert anon.map_count(page * PS) >= mapped, page


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


PLACED = (
    mapper.Mapper.map,
    mapper.Mapper._check_owned,
    mapper.Mapper._pieces,
    mapper.Mapper._cut,
    mapper.Mapper._forget,
    mapper.Mapper._mmap,
    mapper.Mapper._close_mapping,
    mapper.Mapper._unmap_spans,
    mapper.Mapper._calls,
    mapper.Mapper._make_calls,
    anon_module.Anon._gain,
    anon_module.Anon._lose,
    anon_module.Anon._punch,
)


def _placed(anon: devanon.Anon) -> None:
    """Map three pages, place a page of the object over the middle one (``address=``),
    write both, close both."""
    m = anon.map(PS, 3 * PS)
    ctypes.memset(m.address, 3, 3 * PS)
    p = anon.map(8 * PS, PS, address=m.address + PS)
    ctypes.memset(p.address, 4, 1)
    p.close()
    m.close()


def _placed_targets() -> list[tuple[Any, ...]]:
    anon = devanon.Anon(64 * PS)
    try:
        return reached(lambda: _placed(anon), PLACED)
    finally:
        anon.close()


@pytest.mark.parametrize(("name", "code", "line"), _placed_targets())
def test_an_interrupt_in_a_placed_map_leaves_the_books_true(
    name: str, code: CodeType, line: int
) -> None:
    """The same for ``map(address=...)`` over the object's own mapping (what was there
    counts as unmapped), and the closes after it: and no page's count falls below what
    ``/proc/self/maps`` shows (an under-count would free a mapped page)."""
    anon = devanon.Anon(64 * PS)
    try:
        keep = anon.map(0, PS)
        ctypes.memset(keep.address, 1, 1)
        with interrupt_at(code, line) as fired, contextlib.suppress(KeyboardInterrupt):
            _placed(anon)
        assert fired[0]
        assert oracle.stray_segments(anon) == []
        assert anon.stats().mappings == _owners(anon)
        _never_under(anon)
        assert ctypes.string_at(keep.address, 1) == b"\x01"
        _placed(anon)  # the same again still works
        assert oracle.stray_segments(anon) == []
        assert anon.stats().mappings == _owners(anon)
    finally:
        _closes(anon)
