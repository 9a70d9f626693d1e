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
import dis
import itertools
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from types import CodeType, FrameType
from typing import Any

import oracle
import pytest

import devanon
from devanon import anon as anon_module
from devanon import mapper

PS = 4096


def _lines_after_calls(code: CodeType) -> list[int]:
    """The lines of ``code`` whose start a signal handler can reach: each that follows
    (in bytecode order) a line that calls something.

    A ``try:`` line is a NOP that no entry of the exception table covers (3.11): an
    exception raised there by the trace would skip the ``with`` around it, which a
    handler's cannot (it comes from the call before, which the table covers). The line
    after it stands in for it."""
    lines: list[tuple[int, bool, bool]] = []  # (line, it calls, it is a NOP), in order
    for ins in dis.get_instructions(code):
        if ins.starts_line is not None:
            lines.append((ins.starts_line, False, ins.opname == "NOP"))
        if lines and ins.opname.startswith(("CALL", "PRECALL")):
            lines[-1] = (lines[-1][0], True, lines[-1][2])
    reached = set()
    for k, ((_, calls, _), (line, _, nop)) in enumerate(itertools.pairwise(lines)):
        if calls:
            reached.add(lines[k + 2][0] if nop and k + 2 < len(lines) else line)
    return sorted(reached)


@contextlib.contextmanager
def _interrupt_at(code: CodeType, line: int) -> Iterator[list[bool]]:
    """Raise KeyboardInterrupt the first time ``code`` reaches ``line``; yields [fired]."""
    fired = [False]

    def local(frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        if event == "line" and frame.f_lineno == line and not fired[0]:
            fired[0] = True
            raise KeyboardInterrupt("as from a signal handler")
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        return local if frame.f_code is code else None

    sys.settrace(tracer)
    try:
        yield fired
    finally:
        sys.settrace(None)


def _books_within_the_kernels(anon: devanon.Anon) -> None:
    """Every range the books say is mapped is a mapping of the object's file."""
    mapped = oracle.maps_entries(oracle.file_id(anon.fd))
    for seg in anon._segments:
        assert any(start <= seg.start and seg.stop <= end for start, end, _ in mapped), seg


def _closes(anon: devanon.Anon) -> None:
    done = threading.Thread(target=anon.close, daemon=True)
    done.start()
    done.join(10)
    assert not done.is_alive(), "close() did not end"


def _reached(run: Callable[[], None], functions: Iterable[Callable[..., Any]]) -> list[Any]:
    """``(name, code, line)`` for each line of these functions that a signal handler can
    reach and that ``run`` runs (it is run once to see, traced)."""
    codes = {f.__code__ for f in functions}
    ran: set[tuple[CodeType, int]] = set()

    def local(frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        if event == "line":
            ran.add((frame.f_code, frame.f_lineno))
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        return local if frame.f_code in codes else None

    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(None)
    return [
        (code.co_name, code, line)
        for code in sorted(codes, key=lambda c: c.co_firstlineno)
        for line in _lines_after_calls(code)
        if (code, line) in ran
    ]


def _targets(viewed: bool, *functions: Callable[..., Any]) -> list[tuple[Any, ...]]:
    """``(name, code, line, viewed)`` for each line of these functions that a signal
    handler can reach and that the scenario runs."""
    anon = devanon.Anon(64 * PS)
    try:
        reached = _reached(lambda: _scenario(anon, viewed), functions)
    finally:
        anon.close()
    return [(*target, viewed) for target in reached]


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
    with _interrupt_at(code, line) as fired, contextlib.suppress(KeyboardInterrupt):
        _scenario(anon, viewed)
    assert fired[0]
    _books_within_the_kernels(anon)
    assert ctypes.string_at(keep.address, 1) == b"\x01"  # the other mapping is untouched
    for _ in range(3):  # more maps and closes over the same addresses still work
        anon.map(PS, 2 * PS).close()
        _books_within_the_kernels(anon)
        assert [seg.start for seg in anon._segments] == anon._starts  # in step again


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
