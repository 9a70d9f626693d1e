"""Who a client is: the groups of the credentials it connected with.

SO_PEERCRED gives the uid and the primary gid of the process as it was at connect();
SO_PEERGROUPS (Linux 4.13) gives the supplementary groups of those same credentials.
/proc/PID/status is no substitute: it shows the main thread's groups *now*, and a thread
may differ (the raw setgroups/setresuid system calls change one thread's credentials), or
the process may have changed them since: a client in no group could borrow its main
thread's. It is read only on a kernel without SO_PEERGROUPS.

Python's ``socket.getsockopt`` takes at most 1,024 bytes (256 groups), and a process may
have 65,536: hence ``_libc.getsockopt``, retried with the room the kernel asks for.
"""

from __future__ import annotations

import array
import errno
import socket
from typing import Final

from devanon import _libc

SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
"""getsockopt: the peer's supplementary groups at connect(), an array of gid_t."""

_FIRST_ROOM: Final = 64 * 4
"""Bytes the first call has room for: 64 groups (the kernel says how many more it needs)."""


def peer_groups(sock: socket.socket, pid: int, gid: int) -> set[int]:
    """The primary and supplementary groups ``sock``'s peer connected with."""
    try:
        return {gid, *_connected_groups(sock.fileno())}
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            raise
    return {gid, *_proc_groups(pid)}  # a kernel before 4.13


def _connected_groups(fd: int) -> list[int]:
    """SO_PEERGROUPS of the socket ``fd``. Too small a buffer gets the room needed; the
    groups cannot change between the calls (they are the connect()'s)."""
    room = _FIRST_ROOM
    while True:
        value, needed = _libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, room)
        if not needed:
            return list(array.array("I", value))
        room = needed


def _proc_groups(pid: int) -> list[int]:
    """The supplementary groups of ``pid``'s main thread now (no SO_PEERGROUPS)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except OSError:
        pass
    return []
