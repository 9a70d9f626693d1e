"""The daemon's time a user's VERIFYs may take (they read clients' /proc/PID/maps, which
those clients' owners make as long as they like, while the daemon serves no one)."""

from __future__ import annotations

import errno

import pytest

from devanon.broker import server
from devanon.broker.server import VERIFY_MOST_S, Ration


def test_a_ration_spent_refuses_until_it_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(server.time, "monotonic", lambda: now[0])
    ration = Ration()
    ration.check(1000)
    ration.spend(VERIFY_MOST_S + 0.25)  # one VERIFY may overrun by what it took
    with pytest.raises(OSError, match=r"uid 1000's VERIFYs .* try again in 5\.0 s") as refused:
        ration.check(1000)
    assert refused.value.errno == errno.EAGAIN
    now[0] += 4.9
    with pytest.raises(OSError):
        ration.check(1000)
    now[0] += 0.2
    ration.check(1000)  # back, at a twentieth of a CPU
    now[0] += 3600
    ration.check(1000)
    assert ration.left == VERIFY_MOST_S  # never more than one VERIFY's worth at once


def test_reading_who_holds_the_pins_is_timed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pins' part of a VERIFY reads every client's /proc/PID/fd (19,000 descriptors a
    client made each VERIFY take 1.9 s, none refused): it stops once out of time."""
    import os

    from devanon.broker.objects import SharedObject

    obj = SharedObject("pinned", 4 * 4096, 0, 0, 0o600)
    r, w = os.pipe()
    try:
        obj.pin(r, [(0, 1)], uid=1000, pid=1)
        read: list[int] = []
        monkeypatch.setattr(server, "pipes_written_by", lambda pid, *_: read.append(pid) or set())

        def in_time() -> None:
            if len(read) == 2:
                raise OSError(errno.EAGAIN, "out of time")

        with pytest.raises(OSError, match="out of time"):
            server._pins_shown(obj, {10: -1, 11: -1, 12: -1}, in_time)
        assert read == [10, 11]
    finally:
        obj.close()
        os.close(w)


def test_one_process_maps_are_read_in_time_too() -> None:
    """A client makes its /proc/PID/maps as long as it likes (240 MB took 3.5 s to read
    in one go): the lines are read a few thousand at a time, the clock looked at between,
    and nothing is added when it says stop."""
    import os

    from devanon.broker.verify import add_maps_of
    from devanon.counts import MapCounts

    into = MapCounts(1 << 20)
    looked = []

    def in_time() -> None:
        looked.append(1)
        raise OSError(errno.EAGAIN, "out of time")

    st = os.stat("/proc/self/exe")
    with pytest.raises(OSError, match="out of time"):
        add_maps_of(os.getpid(), st.st_dev, st.st_ino, 4096, into, None, in_time)
    assert looked == [1] and into.mapped_pages() == 0
    add_maps_of(os.getpid(), st.st_dev, st.st_ino, 4096, into)  # the interpreter's pages
    assert into.mapped_pages() > 0
