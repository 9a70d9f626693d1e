"""An exception from a signal handler (Ctrl-C) at any line of a SharedAnon's map or close
that a handler can reach: the object may leak a mapping or a count, but the daemon never
counts a page fewer times than the kernel shows it mapped (``verify``), which could punch
it under a live mapping; the client's lock is free, other pages keep their data, and the
client goes on working. The device's counterpart is ``tests/kernel/test_interrupts.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import oracle
import pytest
from broker_daemon import Served
from support import interrupt_at, overlay_scenario, reached, unmap_every_mapping_of

from devanon.broker import Client, SharedAnon
from devanon.broker import ring as rings
from devanon.mapper import Mapper

PS = os.sysconf("SC_PAGE_SIZE")

FUNCTIONS = (
    Mapper.map,
    Mapper._close_mapping,
    SharedAnon._map_counted,
    SharedAnon._mmap_shared,
    SharedAnon._lose_one,
    Client.map_while,
    Client.post_unmap,
    Client._next_seq,
    Client._send_one,
    Client._transmit,
    Client._await,
    Client._ring_reply_to,
    Client._reply_to,
    Client._socket_reply_to,
    Client._receive,
    rings.ClientRing.post,
    rings.ClientRing.reply,
    rings.fence,
)


_MISSED = "the line was not reached"


def _scenario(obj: SharedAnon) -> None:
    """Map a page, write it, close it."""
    m = obj.map(PS, PS)
    ctypes.memset(m.address, 2, 1)
    m.close()


def _undercounted(client: Client, name: str) -> list[dict[str, int]]:
    return [d for d in client.verify(name) if d["daemon_count"] < d["kernel_count"]]


OVERLAY_FILE = Path("/dev/shm") / f"devanon-broker-intr-{os.getpid()}"


def _overlays(obj: SharedAnon) -> None:
    overlay_scenario(obj, OVERLAY_FILE, PS)


OVERLAY_FUNCTIONS = (
    Mapper.overlay,
    Mapper._release_overlay,
    Mapper.unmap,
    Mapper._unmap_spans,
    Mapper._calls,
    Mapper._make_calls,
    Mapper._forget,
    Mapper._cut,
    Mapper._discard_overlay,
    Mapper._close_mapping,
    SharedAnon._gain,
    SharedAnon._lose,
    SharedAnon._range_bodies,
    Client.call,
    Client.post,
    Client._exchange,
    Client._transmit,
    Client._await,
    Client._reply_to,
    Client._socket_reply_to,
    Client._receive,
)


def _interrupted(
    client: Client, name: str, scenario: Callable[[SharedAnon], None], code: Any, line: int
) -> list[str]:
    """The scenario with an interrupt at ``line`` of ``code``, then three more; what went
    wrong."""
    with open(OVERLAY_FILE, "rb") as f:
        laid = oracle.file_id(f.fileno())
    obj = client.open(name, 16 * PS, create=True)
    keep = obj.map(0, PS)
    keep.view()[:1] = b"k"
    obj.map(2 * PS, PS).close()  # the ring (if any) is there before the interrupt
    wrong = []
    with interrupt_at(code, line) as fired, contextlib.suppress(KeyboardInterrupt):
        scenario(obj)
    if not fired[0]:  # a wait's line that this run did not need (the reply was there)
        wrong.append(_MISSED)
    if client._lock._is_owned():  # type: ignore[attr-defined]
        wrong.append("the client's lock is held")
    if stray := oracle.stray_segments(obj, laid):
        wrong.append(f"the books name memory not ours: {stray}")
    try:
        for _ in range(3):
            with contextlib.suppress(ValueError):  # (what the books no longer hold)
                scenario(obj)
            if stray := oracle.stray_segments(obj, laid):
                wrong.append(f"then the books name memory not ours: {stray}")
        obj.flush()
    except Exception as e:
        wrong.append(f"then: {e!r}")
    if under := _undercounted(client, name):
        wrong.append(f"under-counted: {under}")
    if bytes(keep.view()[:1]) != b"k":
        wrong.append("the kept page lost its data")
    keep.close()
    unmap_every_mapping_of(os.fstat(obj.fd))  # a mapping the interrupt lost
    try:
        obj.close()
    except Exception as e:
        wrong.append(f"close: {e!r}")
    client.unlink(name)
    return wrong


@pytest.mark.parametrize(
    ("scenario", "functions"),
    [(_scenario, FUNCTIONS), (_overlays, OVERLAY_FUNCTIONS)],
    ids=["map-close", "overlays"],
)
@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_an_interrupt_in_a_shared_object_never_undercounts(
    daemon: Served,
    ring: bool,
    scenario: Callable[[SharedAnon], None],
    functions: tuple[Callable[..., Any], ...],
) -> None:
    OVERLAY_FILE.write_bytes(b"o" * 2 * PS)
    try:
        problems, missed, reached_lines = _sweep(daemon, ring, scenario, functions)
    finally:
        OVERLAY_FILE.unlink()
    assert problems == []
    assert missed <= reached_lines // 10, f"{missed} of {reached_lines} lines not reached"


def _sweep(daemon: Served, ring: bool, scenario: Any, functions: Any) -> tuple[list[Any], int, int]:
    """Each line in turn: ``(problems, lines not reached, lines)``."""
    with Client(daemon.socket, ring=ring) as probe:
        obj = probe.open("probe", 16 * PS, create=True)
        obj.map(0, PS).close()
        assert (probe._ring is not None) == ring
        targets = reached(lambda: scenario(obj), functions)
        obj.close()
        probe.unlink("probe")
    assert len(targets) >= 20, targets
    problems, missed = [], 0
    for k, (name, code, line) in enumerate(targets):
        with Client(daemon.socket, ring=ring) as client:
            wrong = _interrupted(client, f"interrupted-{k}", scenario, code, line)
        if wrong == [_MISSED]:
            missed += 1
        elif wrong:
            problems.append((name, line, wrong))
    return problems, missed, len(targets)
