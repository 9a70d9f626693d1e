"""Helpers shared by the test suites (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import ctypes
import dis
import errno
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (CI runs as root)")


def interrupt_after_next_mmap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next ``_libc.mmap`` (or ``mmap_status``, the hot path's) succeed, then
    SIGINT this process: KeyboardInterrupt comes just after the mapping exists, before its
    caller has its address."""
    import signal

    from devanon import _libc

    real = {name: getattr(_libc, name) for name in ("mmap", "mmap_status")}

    def patched(name: str) -> Callable[..., int]:
        def mmap_then_sigint(*args: int) -> int:
            for each, function in real.items():
                monkeypatch.setattr(_libc, each, function)
            address: int = real[name](*args)
            os.kill(os.getpid(), signal.SIGINT)
            return address

        return mmap_then_sigint

    for name in real:
        monkeypatch.setattr(_libc, name, patched(name))


def interrupt_once(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, *, after_call: bool = False
) -> None:
    """Make the next call of ``owner.name`` raise KeyboardInterrupt (after doing its work,
    with ``after_call``), as a Ctrl-C there would; later calls are the real ones again."""
    real = getattr(owner, name)

    def interrupted(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(owner, name, real)
        if after_call:
            real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)


def unmap_every_mapping_of(st: os.stat_result) -> None:
    """munmap what this process maps of the file ``st`` (a mapping lost by a test)."""
    from devanon import _libc

    with open("/proc/self/maps") as f:
        lines = [line.split() for line in f]
    for fields in lines:
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        if int(fields[4]) == st.st_ino and (major, minor) == (
            os.major(st.st_dev),
            os.minor(st.st_dev),
        ):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            _libc.munmap(lo, hi - lo)


def data_pages(fd: int, size: int, page_size: int) -> set[int]:
    """Indices of the pages in ``[0, size)`` that hold data (SEEK_DATA / SEEK_HOLE)."""
    pages: set[int] = set()
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after pos
                break
            raise
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        pages.update(range(data // page_size, -(-hole // page_size)))
        pos = hole
    return pages


def kernel_counts(fd: int, pids: list[int]) -> dict[int, int]:
    """Page -> how many VMAs of ``pids`` map the file ``fd`` there (the kernel's view,
    summed over the processes)."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    st = os.fstat(fd)
    counts: dict[int, int] = {}
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split()
                if int(fields[4]) != st.st_ino:
                    continue
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                if (major, minor) != (os.major(st.st_dev), os.minor(st.st_dev)):
                    continue
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                first = int(fields[2], 16) // page_size
                for page in range(first, first + (hi - lo) // page_size):
                    counts[page] = counts.get(page, 0) + 1
    return counts


def start_child(body: Callable[[], int]) -> int:
    """Fork and run ``body()`` in the child (its return value is the exit code, 1 if it
    raises); returns the child's pid at once, for a parent that talks to it meanwhile."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body()
        finally:
            os._exit(code)
    return pid


def run_child(body: Callable[[], int]) -> int:
    """Fork, run ``body()`` in the child (its return value is the exit code), wait."""
    return os.waitstatus_to_exitcode(os.waitpid(start_child(body), 0)[1])


# -- interrupts placed by a line trace (as a signal handler's exception) ----------------


def lines_after_calls(code: CodeType) -> list[int]:
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
def interrupt_at(code: CodeType, line: int) -> Iterator[list[bool]]:
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


def reached(run: Callable[[], None], functions: Iterable[Callable[..., Any]]) -> list[Any]:
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
        for line in lines_after_calls(code)
        if (code, line) in ran
    ]


def run_script(script: str, timeout: float, **names: str) -> list[list[str]]:
    """Run ``script`` in a new interpreter (fork hooks and traces are best kept out of
    pytest's process), with ``TESTS`` (this directory) and ``names`` set as strings first;
    it must exit 0. Returns its output's lines, split into words."""
    names = {"TESTS": str(Path(__file__).resolve().parent), **names}
    head = "".join(f"{name} = {value!r}\n" for name, value in names.items())
    done = subprocess.run(
        [sys.executable, "-c", head + script], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [line.split() for line in done.stdout.splitlines()]


def overlay_scenario(obj: Any, path: Path, page_size: int) -> None:
    """An overlay laid and released; another laid, then unmapped with its neighbours in one
    unmap of several pieces; the rest closed (for an Anon or a SharedAnon)."""
    ps = page_size
    m = obj.map(4 * ps, 6 * ps)
    ctypes.memset(m.address, 2, 6 * ps)
    obj.overlay(m.address + ps, path, 0, ps).release()
    obj.overlay(m.address + 3 * ps, path, ps, ps)
    obj.unmap(m.address + 2 * ps, 3 * ps)  # a plain page, the overlay, a plain page
    m.close()
