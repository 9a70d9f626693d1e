"""A walk through the device, every figure read from the kernel (``st_blocks``, SEEK_DATA).

What ``devanon demo`` runs until the guest demo of the ubd-mmap issue takes its place: map a
range twice, write it, unmap one mapping (nothing is freed), unmap the other (all of it is),
lay a real file's pages over written memory (the Anon pages under it go back to the host),
and punch a hole in an ordinary file with ``punch_hole``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from devanon.anon import PAGE_SIZE, Anon
from devanon.punch import data_extents, punch_hole
from devanon.sizes import format_size


@dataclass(slots=True, frozen=True)
class Step:
    """One step of the tour and what the kernel said after it."""

    action: str
    resident_bytes: int
    """``st_blocks`` of the Anon's memfd, in bytes."""
    data_bytes: int
    """Bytes SEEK_DATA/SEEK_HOLE find in the memfd."""
    map_count: int
    """The count of the Anon's first page."""


def data_bytes(fd: int, size: int) -> int:
    """Bytes of ``fd`` that SEEK_DATA/SEEK_HOLE call data (the kernel's view of holes)."""
    return sum(hole - data for data, hole in data_extents(fd, 0, size))


def run(size: int = 256 << 20, report: Callable[[Step], None] | None = None) -> list[Step]:
    """Run the tour on an Anon of ``size`` bytes; returns the steps."""
    if size <= 0 or size % (2 * PAGE_SIZE):
        raise ValueError(
            f"--size {size} is not a positive multiple of 2 pages ({2 * PAGE_SIZE}): the "
            "tour maps halves of it"
        )
    steps: list[Step] = []
    with Anon(size, name="devanon-tour") as mem:

        def note(action: str) -> None:
            step = Step(action, mem.resident_bytes(), data_bytes(mem.fd, size), mem.map_count(0))
            steps.append(step)
            if report is not None:
                report(step)

        half = size // 2
        note(f"created a {format_size(size)} Anon (a sealed memfd)")
        a = mem.map(0, size)
        a.view()[:half] = b"\xa5" * half
        note(f"mapped it (A) and wrote {format_size(half)}")
        b = mem.map(0, half)
        note("mapped the written half again (B)")
        a.close()
        note("unmapped A: B still maps the written half, nothing freed")
        b.close()
        note("unmapped B: every count is zero, the pages went back")

        with tempfile.NamedTemporaryFile(prefix="devanon-tour-") as disk:
            image = _real_bytes(half)
            disk.write(image)
            disk.flush()
            guest = mem.map(0, half)
            guest.view()[:] = b"\x5a" * half
            note(f"a 'guest' mapped {format_size(half)} and wrote all of it")
            overlay = mem.overlay(guest.address, disk.name, 0, half)
            same = bytes(guest.view()) == image
            note(f"overlaid a file over it (reads the file: {same}): Anon pages punched")
            overlay.release()
            note("released the overlay: the Anon is back, reading zeros, costing nothing")
            guest.close()

            before = os.fstat(disk.fileno()).st_blocks * 512
            result = punch_hole(disk.name, 0, half // 2)
            after = os.fstat(disk.fileno()).st_blocks * 512
            note(
                f"punch_hole on the file itself: {format_size(before)} -> {format_size(after)} "
                f"({format_size(result.freed_bytes)} freed)"
            )
    return steps


def _real_bytes(n: int) -> bytes:
    """``n`` bytes of real file data (the Python interpreter, repeated): not random."""
    with open(sys.executable, "rb") as f:
        chunk = f.read(n)
    return (chunk * (n // max(1, len(chunk)) + 1))[:n]
