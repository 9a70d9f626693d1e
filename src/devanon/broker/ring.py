"""The request ring: one-range MAP and UNMAP through memory shared with the daemon.

A message on the socket costs a system call on each side and, when the other side sleeps,
a wake-up; on a virtual machine that is most of what a map costs. So a client may ask for
a ring (``Op.RING``): a small memfd the daemon made and sealed, mapped by both. The
client writes one-range MAP and UNMAP requests into it, and the daemon, while it polls,
writes each MAP's reply back; neither makes a system call for them. It is the shape of
io_uring's submission and completion queues with ``IORING_SETUP_SQPOLL``, and of virtio's
rings with notification suppression: a side that goes to sleep says so in the ring, and
only then does the other ring the doorbell (an ``Op.WAKE`` message on the socket).

Layout (little-endian; ``u64`` words, each side writing only its own cache line)::

    0    client: req_tail, rep_head, waiting (1: asleep, wants an Op.WAKE for a reply)
    64   daemon: req_head, rep_tail, asleep  (1: asleep, wants an Op.WAKE for a request)
    128  SLOTS request slots of 32 bytes: the MAP_ONE message (28 bytes) and 4 zero bytes
    ...  SLOTS reply slots of 8 bytes: the REPLY header (op, status, seq)

A slot is written before the index that publishes it, and read after the index; x86-64
keeps stores in order and loads in order, so that needs no fence. Going to sleep is the
one place where a store must be seen before a later load (the sleeper's flag, then the
other side's index: otherwise both could miss each other). Both sides put a full fence
there: a ``threading.Lock`` acquire and release, which is a locked instruction on
x86-64. Rings are therefore only offered on x86-64; other machines use the socket.

The daemon trusts nothing it reads back: it keeps its own indices, and a client whose
indices are impossible is cut off.
"""

from __future__ import annotations

import _thread
import fcntl
import mmap
import os
import platform
import struct

from devanon.broker import protocol as wire

SLOTS = 256
REQUEST = struct.Struct("<BxHIIQQxxxx")
"""A request slot: the MAP_ONE message, padded to 32 bytes."""
REPLY = wire.REPLY
"""A reply slot: the reply header (8 bytes)."""

# word indices
REQ_TAIL, REP_HEAD, WAITING = 0, 1, 2
REQ_HEAD, REP_TAIL, ASLEEP = 8, 9, 10
_REQUESTS = 128
_REPLIES = _REQUESTS + SLOTS * REQUEST.size
SIZE = 4 * mmap.PAGESIZE
"""Bytes of a ring (room for the layout above, whole pages)."""

SUPPORTED = platform.machine() in ("x86_64", "AMD64")
"""Whether this machine keeps the ordering the ring relies on (x86-64's)."""


def fence() -> None:
    """A full memory barrier: a lock's acquire and release are locked instructions. A new
    lock each time: a signal handler that fences while the code it interrupted was between
    acquire and release would wait for itself on a shared one (and so would a child forked
    by another thread meanwhile)."""
    lock = _thread.allocate_lock()
    lock.acquire()
    lock.release()


FULL, POSTED, WAKE_DAEMON = 0, 1, 2
"""What ``ClientRing.post`` did."""


class RingError(ValueError):
    """The other side wrote indices that cannot be (a broken or hostile peer)."""


def create() -> int:
    """A new ring's memfd (the daemon's), sealed so no client can shrink it under us."""
    fd = os.memfd_create("devanon-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, SIZE)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Shared:
    """The ring's memory as words and slots."""

    def __init__(self, fd: int) -> None:
        if os.fstat(fd).st_size < SIZE:
            raise RingError(f"a ring is {SIZE} bytes, not {os.fstat(fd).st_size}")
        self._map = mmap.mmap(fd, SIZE)
        self._all = memoryview(self._map)
        self.words = self._all[:_REQUESTS].cast("Q")
        self.requests = self._all[_REQUESTS:_REPLIES]
        self.replies = self._all[_REPLIES : _REPLIES + SLOTS * REPLY.size]

    def close(self) -> None:
        for view in (self.words, self.requests, self.replies, self._all):
            view.release()
        self._map.close()


class ClientRing(_Shared):
    """The client's side: post requests, take replies.

    Not re-entrant, and a signal handler may call the client in the middle of any of these:
    while one runs, ``busy`` is set, and a nested ``post`` answers ``FULL`` (so the nested
    request goes on the socket, served after what the ring holds).
    """

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.busy = False

    def post(self, op: int, flags: int, seq: int, handle: int, offset: int, length: int) -> int:
        """Write a request: ``FULL`` (send it on the socket instead), ``POSTED``, or
        ``WAKE_DAEMON`` (posted, but the daemon sleeps: send it an Op.WAKE)."""
        words = self.words
        tail = words[REQ_TAIL]
        if self.busy or tail - words[REQ_HEAD] >= SLOTS:
            return FULL
        self.busy = True
        try:
            REQUEST.pack_into(
                self.requests, (tail % SLOTS) * REQUEST.size, op, flags, seq, handle, offset, length
            )
            words[REQ_TAIL] = tail + 1
            fence()
            return WAKE_DAEMON if words[ASLEEP] else POSTED
        finally:
            self.busy = False

    def posted(self, seq: int, tail: int) -> bool:
        """Whether request ``seq`` went in at index ``tail`` (to tell, after an interrupt,
        whether the daemon will see it)."""
        words = self.words
        if words[REQ_TAIL] <= tail:
            return False
        return bool(REQUEST.unpack_from(self.requests, (tail % SLOTS) * REQUEST.size)[2] == seq)

    def reply(self) -> tuple[int, int, int] | None:
        """The next reply ``(op, status, seq)``, or None."""
        words = self.words
        head = words[REP_HEAD]
        ready = words[REP_TAIL] - head
        if not ready or self.busy:
            return None
        if not 0 < ready <= SLOTS:
            raise RingError(f"the daemon's reply index is {ready} ahead of ours")
        self.busy = True
        try:
            reply = REPLY.unpack_from(self.replies, (head % SLOTS) * REPLY.size)
            words[REP_HEAD] = head + 1
            return reply
        finally:
            self.busy = False

    def sleep(self, waiting: bool) -> bool:
        """Say whether we sleep waiting for a reply; on True, whether one may be there
        already (look again rather than sleep)."""
        self.words[WAITING] = int(waiting)
        if not waiting:
            return False
        fence()
        return self.words[REP_TAIL] != self.words[REP_HEAD]


class DaemonRing(_Shared):
    """The daemon's side: take requests, post replies. Its indices are its own copies."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.head = 0
        self.tail = 0

    def pending(self) -> bool:
        """Whether the client has written requests not yet taken."""
        return self.words[REQ_TAIL] != self.head

    def take(self) -> list[tuple[int, int, int, int, int, int]]:
        """Every request written so far: ``(op, flags, seq, handle, offset, length)``."""
        n = self.words[REQ_TAIL] - self.head
        if not n:
            return []
        if not 0 < n <= SLOTS:
            raise RingError(f"request index {self.words[REQ_TAIL]}: {n} requests past ours")
        unpack, slots, head = REQUEST.unpack_from, self.requests, self.head
        taken = [unpack(slots, ((head + i) % SLOTS) * REQUEST.size) for i in range(n)]
        self.head = head + n
        self.words[REQ_HEAD] = self.head
        return taken

    def reply(self, op: int, status: int, seq: int) -> bool | None:
        """Post a reply; None if the client left no room (it reads none), else whether it
        sleeps and wants an Op.WAKE."""
        words = self.words
        if not 0 <= self.tail - words[REP_HEAD] < SLOTS:
            return None
        REPLY.pack_into(self.replies, (self.tail % SLOTS) * REPLY.size, op, status, seq)
        self.tail += 1
        words[REP_TAIL] = self.tail
        fence()
        return bool(words[WAITING])

    def sleep(self, asleep: bool) -> None:
        """Say whether the daemon sleeps (then the client rings the doorbell)."""
        self.words[ASLEEP] = int(asleep)
