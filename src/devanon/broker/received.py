"""Descriptors that clients send the daemon: looked at and let go of without waiting.

A client chooses what it sends, and the daemon serves everyone from one thread, so nothing
it does with such a descriptor may block. ``close`` can: a TCP socket with ``SO_LINGER``
and unsent data waits out its linger (up to 2**31 s), a FUSE file waits on its server's
flush, an AF_UNIX socket drops the descriptors queued in it. So descriptors the daemon
does not keep are closed by a thread of its own (``Closer``), with the sockets of the
clients it cuts off; it receives every descriptor a message carries (the kernel would
close those that find no room itself, in the daemon's thread); and a PIN's lifeline is
first named by ``/proc/self/fd`` (which asks no file system) before anything else is asked
of it (``check_lifeline``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import threading
from collections.abc import Iterable

from devanon.broker import protocol as wire


class Closer:
    """Closes descriptors without waiting: a pipe at once (its close never waits), anything
    else in a thread of its own, in the order given. A file's close may wait on its file
    system (a FUSE server's flush); a socket's, on its linger (a TCP socket with unsent
    data), or on the descriptors queued in it (an AF_UNIX socket's unread messages may
    carry such a socket). Nothing is changed on them: a client's copy is the client's."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def backlog(self) -> int:
        """Descriptors waiting for the thread (one close that blocks holds up the rest)."""
        return self._queue.qsize()

    def close(self, fds: Iterable[int]) -> None:
        """Close these, now or soon; never waits."""
        for fd in fds:
            if _is_pipe(fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
                continue
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="devanon-closer", daemon=True
                )
                self._thread.start()
            self._queue.put(fd)

    def stop(self, timeout: float = 1.0) -> None:
        """Close what is queued, waiting at most ``timeout`` seconds (a close that blocks
        for longer is left to the process's exit)."""
        if self._thread is not None:
            self._queue.put(-1)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while (fd := self._queue.get()) >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def check_lifeline(fd: int) -> None:
    """ProtocolError unless ``fd`` is the read end of a pipe (os.pipe), open read-only.

    A lifeline must read EOF once the child and its descendants are gone. Open for writing
    (a pipe's write end, or its read end reopened read-write through /proc/self/fd), the
    daemon itself would hold a writer, so it never would. A named FIFO that no writer ever
    opened never polls readable either: the kernel reports its EOF only once a writer came.
    Anything else is refused by its name alone: an ``fstat`` of a FUSE file can wait on its
    server for ever."""
    if not _is_pipe(fd):  # a named FIFO shows its path
        raise wire.ProtocolError("a PIN's lifeline is the read end of a pipe (not a named FIFO)")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
        raise wire.ProtocolError(
            "a PIN's lifeline is a pipe's read end open read-only: open for writing, it "
            "would never read EOF"
        )


def _is_pipe(fd: int) -> bool:
    """Whether ``fd`` is a pipe (os.pipe), by its ``/proc/self/fd`` name alone: that asks
    no file system, where an ``fstat`` of a FUSE file can wait on its server for ever."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:[")
    except OSError:
        return False
