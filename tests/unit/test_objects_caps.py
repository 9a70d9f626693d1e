"""The daemon's per-client caps on an object's counts (no daemon: SharedObject alone)."""

from __future__ import annotations

import errno
import os

import pytest

from devanon.broker import objects
from devanon.broker.objects import SharedObject
from devanon.counts import DENSE_CHUNK


def test_refused_unmaps_leave_no_dense_chunk_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """One-page holes turn chunk after chunk dense; past the cap each unmap is refused and
    must leave the client's counts as they were, in values and in memory."""
    monkeypatch.setattr(objects, "MAX_CLIENT_DENSE", 2)  # the same path, fewer chunks
    chunks = 8
    obj = SharedObject("caps", chunks * DENSE_CHUNK * 4096, 0, 0, 0o600)
    try:
        obj.map(1, [(0, chunks * DENSE_CHUNK)])
        obj.map(2, [(0, chunks * DENSE_CHUNK)])  # nothing falls to 0
        holder = obj.holders[1]
        refused = 0
        for chunk in range(chunks):
            for j in range(200):  # one-page holes: each splits a run in three
                page = chunk * DENSE_CHUNK + 2 * j + 1
                before = (holder.nruns(), holder.ndense(), holder.count(page))
                try:
                    obj.unmap_one(1, page, page + 1)
                except OSError as e:
                    assert e.errno == errno.ENOMEM
                    assert (holder.nruns(), holder.ndense(), holder.count(page)) == before
                    refused += 1
                    break
        assert refused == chunks - 2 and holder.ndense() == 2
    finally:
        obj.close()


def test_verify_counts_a_pin_unless_its_child_shows_it_and_never_for_its_parent() -> None:
    """A pin's write end held by a client VERIFY reads: that client is the forked child,
    whose maps show the copy (the pin is not counted again); unless it is the parent that
    made the pin, which holds the write end until the fork is done."""
    from devanon.broker.server import _pins_shown

    obj = SharedObject("pinned", 4 * 4096, 0, 0, 0o600)
    lifeline, write_end = os.pipe()
    pidfd = os.pidfd_open(os.getpid())
    try:
        obj.pin(lifeline, [(0, 1)], uid=0, pid=os.getpid())
        me = {os.getpid(): pidfd}
        assert _pins_shown(obj, me) == set()  # we made it: our maps never show the copy
        obj.pins[0].pid = 1  # made by another process, and we hold the write end: shown
        assert _pins_shown(obj, me) == {lifeline}
    finally:
        os.close(write_end)
        os.close(pidfd)
        obj.close()


def test_one_users_pins_leave_room_for_anothers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned-range cap is per uid: a reader that fills it (pins cost it nothing but a
    pipe) does not stop the owner's forks from being pinned."""
    monkeypatch.setattr(objects, "MAX_PINNED_RANGES", 4)
    obj = SharedObject("pins", 64 * 4096, 1000, 1000, 0o644)
    pipes = [os.pipe() for _ in range(3)]
    try:
        obj.pin(pipes[0][0], [(0, 1), (2, 3), (4, 5), (6, 7)], uid=2000)
        before = obj.counts.count(8)
        with pytest.raises(OSError, match="uid 2000 has 4 ranges") as refused:
            obj.pin(pipes[1][0], [(8, 9)], uid=2000)
        assert refused.value.errno == errno.ENOMEM and obj.counts.count(8) == before
        obj.pin(pipes[2][0], [(8, 9), (10, 11)], uid=1000)  # the owner: room of its own
        assert obj.counts.count(8) == before + 1
    finally:
        obj.close()  # closes the pinned read ends
        for _r, w in pipes:
            os.close(w)
        os.close(pipes[1][0])


def test_a_sweep_costs_what_the_data_costs_not_what_the_counts_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counts cut into 16,384 zero runs and one uncounted page of data: the sweep walks
    the data (a few lseeks), not the zero runs (one lseek each, 4.6 s of the daemon's loop
    at the caps), punches that page alone, and leaves counted data (SEEK_DATA tells)."""
    from support import data_pages

    npages = 8 * DENSE_CHUNK
    obj = SharedObject("sweep", npages * 4096, 0, 0, 0o600)
    try:
        obj.map(1, [(p, p + 1) for p in range(0, npages, 2)])
        os.pwrite(obj.fd, b"c", 0)  # page 0: counted
        os.pwrite(obj.fd, b"u", (npages - 1) * 4096)  # the last page: nobody's
        seeks = []
        real = os.lseek

        def lseek(fd: int, pos: int, how: int) -> int:
            seeks.append(pos)
            return real(fd, pos, how)

        monkeypatch.setattr(objects.os, "lseek", lseek)
        assert obj.sweep(float("inf")) is True
        assert len(seeks) <= 6
        monkeypatch.undo()
        assert data_pages(obj.fd, npages * 4096, 4096) == {0}
        assert obj.swept_to == 0
    finally:
        obj.close()
