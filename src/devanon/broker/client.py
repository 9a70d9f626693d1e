"""The Python client of the broker: ``connect()``, ``Client.open()``, ``SharedAnon``.

A SharedAnon maps the object's memfd in this process exactly as an ``Anon`` would (it is a
``Mapper``), but keeps no counts of its own: it tells the daemon, which counts for every
process. A map waits for the daemon's yes *before* the mmap, so no other client's unmap can
free a page between; an unmap is sent after the munmap and not waited for (pipelined). The
daemon's view of the object (counts, resident and freed bytes) is what ``map_count`` and
``stats`` return.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from devanon import _checks, _libc, forking
from devanon.broker import protocol as wire
from devanon.broker import ring as rings
from devanon.broker.server import checked_socket_path, default_socket_path
from devanon.counts import PageRange
from devanon.mapper import Mapper

log = logging.getLogger("devanon.broker")

_WAIT = 0.05
"""Seconds a wait for a reply sleeps before it looks again whether a call nested in it (a
signal handler's) has read the reply for it."""
_AWAKE_WAIT = 0.02
"""Seconds a wait for a ring reply yields the CPU (rather than sleep) while the daemon is
awake: under load the daemon is slow to come to each client, but it comes."""
_LOOK = 0.001
"""Seconds between looks at the socket while yielding."""
_ON_SOCKET: tuple[int, bytes, list[int]] = (wire.STATUS_ERROR, b"", [])
"""An early reply from the ring saying that the request was refused: the refusal itself
(with its text) is on the socket."""
_WAKE = wire.request(wire.Op.WAKE, 0)
_T = TypeVar("_T")
_K = TypeVar("_K", str, int)


class BrokerError(ConnectionError):
    """The daemon is not there, or went away."""


@dataclass(slots=True, frozen=True)
class SharedStats:
    """An object's state over all clients, as the daemon counts it."""

    name: str
    size: int
    page_size: int
    mapped_bytes: int
    resident_bytes: int
    freed_bytes: int
    punch_calls: int
    count_runs: int
    count_bytes: int
    clients: list[dict[str, int]]
    """One entry per client holding counts: pid, uid, mapped_bytes."""
    clients_omitted: int = 0
    """Clients left out of ``clients``: more than one reply of the daemon holds."""


def _result(status: int, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
    """A reply's body and descriptors, or the daemon's error raised."""
    if status == wire.STATUS_OK:
        return body, fds
    for fd in fds:
        os.close(fd)
    (code,) = wire.ERROR.unpack_from(body)
    _raise(code, _error_text(body))


def _error_text(body: bytes) -> str:
    return body[wire.ERROR.size :].decode("utf-8", "replace")


def _take(seqs: set[int], seq: int) -> bool:
    """Remove ``seq`` from ``seqs``; True if it was there."""
    if seq in seqs:
        seqs.discard(seq)
        return True
    return False


def _raise(code: int, message: str) -> NoReturn:
    if code == errno.EINVAL:
        raise ValueError(message)
    raise OSError(code, message)  # FileNotFoundError, PermissionError, ... by errno


class Client:
    """One connection to the daemon. Thread-safe; a forked child reconnects on first use."""

    def __init__(
        self, path: str | None = None, *, spin: float = 200e-6, ring: bool | None = None
    ) -> None:
        self.path = checked_socket_path(path or default_socket_path())
        self.spin = spin
        self._ring_wanted = rings.SUPPORTED if ring is None else bool(ring)
        self._ring: rings.ClientRing | None = None
        """One-range MAPs and UNMAPs go here, once the daemon gave us one (Op.RING)."""
        self._ring_ok = True
        """False from a request sent on the socket until the reply to the last one sent
        there is read: a ring request written meanwhile could be served before it (the
        daemon serves the ring first), and then the order of the two would be lost."""
        self._socket_seq = 0
        """The seq of the last request sent on the socket."""
        self._lock = threading.RLock()
        self._seq = 0
        self._late_errors: list[str] = []
        self._buffers = [bytearray(wire.MAX_MESSAGE)]
        """Receive buffers. A wait takes one for itself: a call nested in it (a signal
        handler's) reads the socket into another, so it cannot overwrite a reply that the
        wait has received and not yet looked at."""
        self._pending: set[int] = set()
        """Requests whose replies someone waits for."""
        self._early: dict[int, tuple[int, bytes, list[int]]] = {}
        """Replies read while waiting for another: ``(status, body, descriptors)``."""
        self._unwanted: set[int] = set()
        """Posted requests whose refusal nobody needs to hear of."""
        self._give_back: dict[int, tuple[int, int, int]] = {}
        """MAPs interrupted as they went on the socket, which may or may not have gone
        out: ``seq -> (handle, offset, length)``. A yes to one is given back (UNMAP)."""
        self.generation = 0
        """Bumped on every (re)connection: handles belong to one connection."""
        self.chores: list[bool] = []
        """Non-empty in a forked child (for good): every object's ``_before_op`` then
        checks whether it is this connection's (the objects' ``_chores``)."""
        self.gone = False
        """True once the connection was found broken (the daemon stopped, say): it stays
        so (a new daemon does not know its handles); ``connect`` makes a new one."""
        self._objects: weakref.WeakSet[SharedAnon] = weakref.WeakSet()
        """What ``open`` returned: ``close`` closes them first."""
        self._sock = self._connect()
        _clients.add(self)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            if e.errno in (errno.EACCES, errno.EPERM):
                why = "this user may not connect (the daemon's --socket-mode, --socket-group)"
            else:
                why = "no devanon daemon there: start `devanon serve`"
            raise BrokerError(e.errno, f"{self.path}: {e.strerror}: {why}") from None
        self.generation += 1
        self._pid = os.getpid()
        self.gone = False  # (a forked child reconnects, maybe to a daemon started since)
        self._drop_ring()
        return sock

    def _drop_ring(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._ring_ok, self._socket_seq = True, 0

    def _after_fork_in_child(self) -> None:
        """The socket is the parent's: drop our copy; the next call reconnects. The lock
        may have been held by a thread that the child does not have: make a new one.

        The first two steps come first, with no call between them (a signal handler runs
        only after a call): its exception later in the hook (which does not stop the
        fork) leaves a child that still reconnects (a new socket and ring: ``_connect``)
        and reopens its objects (``chores``) before its next request. It never speaks on
        its parent's connection, nor sends a handle of it on its own."""
        self._pid = -1
        self.chores.append(True)
        self._lock = threading.RLock()
        self._late_errors = []
        self._pending, self._early, self._unwanted = set(), {}, set()
        self._give_back = {}
        self._sock.close()
        self._drop_ring()  # the parent's: ours comes with our own connection

    # -- requests --------------------------------------------------------------------------

    def call(
        self, op: wire.Op, body: bytes = b"", fds: list[int] | None = None, flags: int = 0
    ) -> tuple[bytes, list[int]]:
        """Send a request and wait for its reply; returns the body and any descriptors."""
        with self._lock:
            seq = self._next_seq()
            return self._exchange(wire.request(op, seq, body, flags), seq, fds)

    def post(self, op: wire.Op, body: bytes, flags: int) -> None:
        """Send a request without waiting (errors come back with a later call)."""
        with self._lock:
            self._transmit(wire.request(op, self._next_seq(), body, flags), None)

    def map_one(self, handle: int, offset: int, length: int) -> None:
        """MAP one range and wait for the yes."""
        with self._lock:
            seq = self._next_seq()
            via_ring = self._send_map(seq, handle, offset, length)
            self._await(seq, via_ring)

    def post_unmap(self, handle: int, offset: int, length: int, *, wanted: bool = True) -> None:
        """Post an UNMAP of one range (the hot path); unless ``wanted``, a refusal of it is
        not reported (``raise_late_errors``)."""
        with self._lock:
            seq = self._next_seq()
            self._send_one(wire.Op.UNMAP, wire.FLAG_NOREPLY, seq, handle, offset, length)
            if not wanted:
                self._unwanted.add(seq)

    def _post_give_back(self, seq: int, handle: int, offset: int, length: int) -> None:
        """Post the UNMAP that gives back MAP ``seq``, whose answer we stopped waiting for:
        the daemon drops it if it refused that MAP (``wire.FLAG_GIVE_BACK``). Its refusal,
        or the MAP's, is nobody's to hear of."""
        flags = wire.FLAG_NOREPLY | wire.FLAG_GIVE_BACK
        self._unwanted.add(seq)
        self._send_one(wire.Op.UNMAP, flags, seq, handle, offset, length)

    def map_while(
        self,
        handle: int,
        offset: int,
        length: int,
        prot: int,
        mmap: Callable[[int, int, int], int],
    ) -> int:
        """MAP one range, making ``mmap(length, prot, offset)`` while the daemon counts;
        returns its address.

        The address is handed out only once the daemon said yes: on a refusal the mapping
        is undone and the daemon's error raised; an OSError from ``mmap`` gives the count
        back. Interrupted while waiting (the daemon may have counted it), the mapping is
        undone and an UNMAP follows, whose answer nobody needs.
        """
        with self._lock:
            seq = self._next_seq()
            self._pending.add(seq)  # (_send_map, written out: the hot path)
            try:
                via_ring = self._send_one(wire.Op.MAP, 0, seq, handle, offset, length)
            except BaseException:
                self._pending.discard(seq)
                raise
            try:
                address = mmap(length, prot, offset)
            except OSError:
                try:
                    self._await(seq, via_ring)
                except Exception:
                    pass  # refused (or the daemon is gone): nothing to give back
                else:
                    self.post_unmap(handle, offset, length)
                raise
            except BaseException:
                self._pending.discard(seq)  # its answer, when it comes, is nobody's
                raise  # (an interrupt: the mapping may exist, so the count stays)
            try:
                self._await(seq, via_ring)
            except Exception:
                _libc.munmap(address, length)  # the daemon said no, or went away
                raise
            except BaseException:
                _libc.munmap(address, length)
                self._post_give_back(seq, handle, offset, length)
                raise
            return address

    def _next_seq(self) -> int:
        if self._pid < 0:  # a forked child: the socket was the parent's
            self._sock = self._connect()
        self._seq = (self._seq % 0xFFFFFFFF) + 1  # never 0: WAKE's
        return self._seq

    def _send_one(
        self, op: wire.Op, flags: int, seq: int, handle: int, offset: int, length: int
    ) -> bool:
        """Send a one-range MAP or UNMAP through the ring if we may, else on the socket;
        True if it went through the ring (its reply, if any, comes there)."""
        ring = self._ring
        if ring is None and self._ring_wanted:
            ring = self._open_ring()
        if ring is not None and self._ring_ok:
            tail = ring.words[rings.REQ_TAIL]
            try:
                posted = ring.post(op, flags, seq, handle, offset, length)
                if posted == rings.WAKE_DAEMON:
                    self._transmit(_WAKE, None)
            except BaseException:
                if op == wire.Op.MAP and ring.posted(seq, tail):  # the daemon will count it:
                    self._post_give_back(seq, handle, offset, length)
                raise
            if posted:
                return True
        try:
            self._transmit(wire.MAP_ONE.pack(op, flags, seq, handle, offset, length), None)
        except BrokerError:
            raise
        except BaseException:
            if op == wire.Op.MAP:  # interrupted: it may have gone out, and nobody will map
                self._give_back[seq] = (handle, offset, length)  # it: see _keep
            raise
        return False

    def _open_ring(self) -> rings.ClientRing | None:
        """Ask the daemon for a ring; None (and no more asking) if it has none to give."""
        self._ring_wanted = False  # the call below must not ask again
        try:
            _, fds = self.call(wire.Op.RING)
        except OSError as e:
            if isinstance(e, BrokerError):
                self._ring_wanted = True
                raise
            log.info("no request ring from the daemon at %s: %s", self.path, e)
            return None  # EOPNOTSUPP, or EPROTO from a daemon that predates rings
        except BaseException:
            self._ring_wanted = True  # interrupted: ask again next time
            raise
        try:
            if len(fds) != 1:
                raise rings.RingError(f"a RING reply carries one descriptor, not {len(fds)}")
            self._ring = rings.ClientRing(fds[0])
        except (OSError, ValueError) as e:
            log.warning("cannot use the ring from the daemon at %s: %s", self.path, e)
        finally:
            for fd in fds:
                os.close(fd)
        self._ring_wanted = True
        return self._ring

    def _transmit(self, message: bytes, fds: list[int] | None) -> None:
        if message[0] != wire.Op.WAKE:
            self._ring_ok = False  # until this request's reply (or a later one's) is read
            self._socket_seq = wire.HEADER.unpack_from(message)[2]
        try:
            if fds:
                socket.send_fds(self._sock, [message], fds)
            else:
                self._sock.send(message)
        except OSError as e:
            raise self._gone(e.strerror) from None

    def _exchange(self, message: bytes, seq: int, fds: list[int] | None) -> tuple[bytes, list[int]]:
        self._awaiting(seq, lambda: self._transmit(message, fds))
        return self._await(seq)

    def _send_map(self, seq: int, handle: int, offset: int, length: int) -> bool:
        """Send a one-range MAP whose reply will be awaited (``_send_one``)."""
        return self._awaiting(
            seq, lambda: self._send_one(wire.Op.MAP, 0, seq, handle, offset, length)
        )

    def _awaiting(self, seq: int, send: Callable[[], _T]) -> _T:
        """``send()`` request ``seq``, marked awaited before it is sent: a call nested in
        ours (a signal handler's) that reads its reply first then keeps it for us instead
        of dropping it."""
        self._pending.add(seq)
        try:
            return send()
        except BaseException:
            self._pending.discard(seq)
            raise

    def _await(self, seq: int, via_ring: bool = False) -> tuple[bytes, list[int]]:
        """The reply to request ``seq`` (from the ring if it went there). Replies come in
        the order of the requests; on the way, errors for posted requests are kept
        (``raise_late_errors``), and the reply of another request still awaited (by a
        signal handler that called us, say) is kept for it."""
        try:
            return self._ring_reply_to(seq) if via_ring else self._reply_to(seq)
        finally:
            self._pending.discard(seq)
            if self._early:  # interrupted after a nested call read our reply: nobody's now
                left = self._early.pop(seq, None)
                if left is not None and left is not _ON_SOCKET:
                    for fd in left[2]:
                        os.close(fd)

    def _ring_reply_to(self, seq: int) -> tuple[bytes, list[int]]:
        """Wait for the ring's answer to ``seq``: look, yielding the CPU between looks (a
        client that spun without yielding kept the CPU from the others, measured: 4% fewer
        pairs a second with 8 clients, and no faster alone), for ``spin`` seconds or while
        the daemon is awake; then sleep on the socket, where the daemon's WAKE comes."""
        ring, deadline, give_up, look = self._ring, 0.0, 0.0, 0.0
        assert ring is not None
        words = ring.words
        while True:
            if self._early and seq in self._early:
                early = self._early.pop(seq)
                return self._reply_to(seq) if early is _ON_SOCKET else _result(*early)
            if words[rings.REP_TAIL] == words[rings.REP_HEAD]:
                got = None  # the common case while waiting, kept short
            else:
                try:
                    got = ring.reply()
                except rings.RingError as e:
                    raise self._gone(str(e)) from None
            if got is not None:
                _, status, rseq = got
                if rseq == seq:
                    if status == wire.STATUS_OK:
                        return b"", []
                    return self._reply_to(seq)  # the refusal, with its text, came first
                if rseq in self._pending:
                    if status == wire.STATUS_OK:
                        self._early[rseq] = (status, b"", [])
                    else:
                        self._early.setdefault(rseq, _ON_SOCKET)
                continue
            now = time.perf_counter()
            if not deadline:
                deadline, give_up, look = now + self.spin, now + _AWAKE_WAIT, now + _LOOK
            if now < deadline or (now < give_up and not words[rings.ASLEEP]):
                # The daemon is awake and will come to us: wait without sleeping (a wake-up
                # costs more than the yields on a virtual machine), looking at the socket
                # now and then for its end.
                os.sched_yield()  # let the daemon have this CPU if it is waiting for one
                if now > look:
                    self._absorb(0)
                    look = now + _LOOK
                continue
            try:
                if not ring.sleep(True):
                    self._absorb(_WAIT)
            finally:
                ring.sleep(False)

    def _absorb(self, timeout: float) -> None:
        """Read what the socket holds, first waiting up to ``timeout`` seconds for it:
        WAKEs, refusals of posted requests, replies someone waits for (kept for them)."""
        sock = self._sock
        if timeout and not self._readable(timeout):
            return
        buf = self._buffers.pop() if self._buffers else bytearray(wire.MAX_MESSAGE)
        try:
            while True:
                try:
                    n, ancillary, _, _ = sock.recvmsg_into(
                        [buf], wire.ANCILLARY, socket.MSG_DONTWAIT
                    )
                except BlockingIOError:
                    return
                except OSError as e:
                    raise self._gone(e.strerror) from None
                op, status, rseq, rfds = self._header(buf, n, ancillary)
                self._keep(op, rseq, (status, bytes(buf[wire.REPLY.size : n]), rfds))
        finally:
            self._buffers.append(buf)

    def _header(
        self, buf: bytearray, n: int, ancillary: list[tuple[int, int, bytes]]
    ) -> tuple[int, int, int, list[int]]:
        """The ``n``-byte reply in ``buf``: op, status, seq, and its descriptors; the
        daemon gone (BrokerError) if it closed the connection or sent no whole header."""
        rfds = wire.descriptors(ancillary) if ancillary else []
        if n < wire.REPLY.size:
            for fd in rfds:
                os.close(fd)
            raise self._gone("it closed the connection" if n == 0 else f"{n}-byte reply")
        op, status, rseq = wire.REPLY.unpack_from(buf)
        if rseq == self._socket_seq:
            self._ring_ok = True  # every request sent on the socket is done
        if self._give_back and op != wire.Op.WAKE:
            # Socket replies come in order: an interrupted MAP before this one that has
            # had no answer never went out.
            for old in [s for s in self._give_back if _before(s, rseq)]:
                del self._give_back[old]
        if self._unwanted and op != wire.Op.WAKE:
            # Nor will a refusal of an earlier posted request come after this: one that
            # the daemon took (or dropped, a give-back) is answered by nothing.
            self._unwanted = {s for s in self._unwanted if not _before(s, rseq)}
        return op, status, rseq, rfds

    def _keep(self, op: int, rseq: int, reply: tuple[int, bytes, list[int]]) -> None:
        """A socket reply to a request other than the one being waited for."""
        if op == wire.Op.WAKE:
            return
        if rseq in self._pending:
            self._early[rseq] = reply
            return
        for fd in reply[2]:
            os.close(fd)
        back = self._give_back.pop(rseq, None)
        if back is not None:  # a MAP interrupted as it was sent: it went out
            if reply[0] == wire.STATUS_OK:
                self.post_unmap(*back, wanted=False)
            return
        if reply[0] != wire.STATUS_OK and not _take(self._unwanted, rseq):
            self._late_errors.append(_error_text(reply[1]))  # a posted unmap refused

    def _reply_to(self, seq: int) -> tuple[bytes, list[int]]:
        buf = self._buffers.pop() if self._buffers else bytearray(wire.MAX_MESSAGE)
        try:
            return self._socket_reply_to(seq, buf)
        finally:
            self._buffers.append(buf)

    def _socket_reply_to(self, seq: int, buf: bytearray) -> tuple[bytes, list[int]]:
        spin = True
        while True:
            if self._early and seq in self._early:  # a call nested in ours (from a signal
                early = self._early.pop(seq)  # handler) read our reply for us
                if early is not _ON_SOCKET:
                    return _result(*early)
            try:
                got = self._receive(buf, spin)
            except OSError as e:
                raise self._gone(e.strerror) from None
            spin = False
            if got is None:
                continue
            n, ancillary = got
            op, status, rseq, rfds = self._header(buf, n, ancillary)
            if rseq == seq:
                if status == wire.STATUS_OK:  # the common case, kept short
                    return (bytes(buf[wire.REPLY.size : n]) if n > wire.REPLY.size else b""), rfds
                return _result(status, bytes(buf[wire.REPLY.size : n]), rfds)
            self._keep(op, rseq, (status, bytes(buf[wire.REPLY.size : n]), rfds))

    def _receive(
        self, buf: bytearray, spin: bool
    ) -> tuple[int, list[tuple[int, int, bytes]]] | None:
        """The next reply, or None if none came within ``_WAIT`` seconds. With ``spin``,
        polls without sleeping for ``self.spin`` seconds first: the daemon answers in
        ~20 us, and waking a sleeping process costs ~100 us on a virtual machine."""
        sock = self._sock
        deadline = time.perf_counter() + (self.spin if spin else 0.0)
        while True:
            try:
                n, ancillary, _, _ = sock.recvmsg_into([buf], wire.ANCILLARY, socket.MSG_DONTWAIT)
                return n, ancillary
            except BlockingIOError:
                if time.perf_counter() > deadline:
                    break
                os.sched_yield()  # let the daemon have this CPU if it is waiting for one
        # Not a blocking recv: the caller looks at _early between waits.
        if not self._readable(_WAIT):
            return None
        try:
            n, ancillary, _, _ = sock.recvmsg_into([buf], wire.ANCILLARY, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        return n, ancillary

    def _readable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the socket to have something to read."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def raise_late_errors(self) -> None:
        """Raise what the daemon said of earlier pipelined unmaps, if it refused any."""
        with self._lock:
            if self._ring is not None and self._pid > 0:
                self._absorb(0)  # a posted ring request's refusal comes on the socket
            if self._late_errors:
                late, self._late_errors = self._late_errors, []
                raise OSError(errno.EIO, f"the daemon refused an earlier unmap: {late}")

    def _gone(self, why: str | None) -> BrokerError:
        self.gone = True
        return BrokerError(errno.ECONNRESET, f"the devanon daemon at {self.path} is gone ({why})")

    # -- the API ---------------------------------------------------------------------------

    def open(
        self,
        name: str,
        size: int | None = None,
        *,
        create: bool = False,
        mode: int = 0o600,
        writable: bool = True,
        exclusive: bool = False,
    ) -> SharedAnon:
        """Open (or with ``create``, make) the object ``name``; returns a SharedAnon.

        ``create`` opens the object if the name exists (as ``O_CREAT``; ``mode`` is then
        not used): anyone who may connect can make a name first. With ``exclusive`` (and
        ``create``), FileExistsError instead, so the object is surely the caller's own (as
        ``O_EXCL``, and as ``multiprocessing.shared_memory`` creates). The SharedAnon's
        ``owner_uid``, ``owner_gid`` and ``mode`` say whose an opened object is.
        """
        raw = _name(name)
        if type(exclusive) is not bool or type(create) is not bool:
            raise TypeError(f"create and exclusive are bools, not {create!r}, {exclusive!r}")
        if exclusive and not create:
            raise ValueError(f"exclusive=True opens nothing without create=True ({name!r})")
        if size is not None:
            size = _checks.integer("size", size)
            if not 0 < size < 1 << 63:
                raise ValueError(f"size must be positive and below 2**63 (off_t), not {size}")
        mode = _checks.integer("mode", mode)
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be within 0o000..0o777, not {mode!r}")
        flags = (
            (wire.OPEN_CREATE if create else 0)
            | (wire.OPEN_WRITABLE if writable else 0)
            | (wire.OPEN_EXCLUSIVE if exclusive else 0)
        )
        body, fds = self.call(wire.Op.OPEN, wire.OPEN.pack(size or 0, mode, flags) + raw)
        handle, real_size, page_size, uid, gid, real_mode = wire.OPENED.unpack(body)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EPROTO, f"the daemon sent {len(fds)} descriptors for {name!r}")
        shared = SharedAnon(self, name, handle, fds[0], real_size, page_size, writable)
        shared.owner_uid, shared.owner_gid, shared.mode = uid, gid, real_mode
        self._objects.add(shared)
        return shared

    def unlink(self, name: str) -> None:
        """Remove the name; the object goes when its last user lets go (like a file)."""
        self.call(wire.Op.UNLINK, _name(name))

    def stat(self, name: str | None = None) -> list[dict[str, Any]]:
        """The objects this peer may see (or one), as the daemon counts them; all of them
        come in pages, by name, so the list may be longer than one message holds."""
        if name:
            body, _ = self.call(wire.Op.STAT, _name(name))
            one: list[dict[str, Any]] = json.loads(body)
            return one
        return self._pages(wire.Op.STAT, "", lambda after: after.encode(), "name")

    def verify(self, name: str) -> list[dict[str, int]]:
        """Recompute ``name``'s counts from the clients' /proc/PID/maps; the differences.
        More than one message holds come in pages, by first page (asked for only then, so
        a daemon older than the pages answers as before)."""
        raw = _name(name)
        try:
            body, _ = self.call(wire.Op.VERIFY, raw)
        except OSError as e:
            if e.errno != errno.EMSGSIZE:
                raise
        else:
            every: list[dict[str, int]] = json.loads(body)
            return every
        return self._pages(wire.Op.VERIFY, 0, lambda after: wire.U64.pack(after) + raw, "stop_page")

    def _pages(
        self, op: wire.Op, start: _K, body: Callable[[_K], bytes], cursor: str
    ) -> list[dict[str, Any]]:
        """A listing that comes in pages (FLAG_AFTER): asked from ``start``, then from the
        ``cursor`` field of each page's last entry, until a page is empty (or, a guard
        against a daemon that repeats itself, does not begin and end past the cursor)."""
        result: list[dict[str, Any]] = []
        after = start
        while True:
            reply, _ = self.call(op, body(after), flags=wire.FLAG_AFTER)
            page: list[dict[str, Any]] = json.loads(reply)
            if not page or page[0][cursor] <= after or page[-1][cursor] <= after:
                return result
            result += page
            after = page[-1][cursor]

    def close(self) -> None:
        """Close every object opened through this connection (their mappings are
        unmapped: the daemon drops their counts when the connection goes), then the
        connection."""
        with self._lock:
            for shared in list(self._objects):
                with contextlib.suppress(BrokerError):  # daemon gone: unmapped all the same
                    shared.close()
            self._sock.close()
            self._drop_ring()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _before(seq: int, other: int) -> bool:
    """Whether request ``seq`` was sent before ``other`` (seqs are u32s that wrap)."""
    return 0 < (other - seq) % (1 << 32) < 1 << 31


def _name(name: object) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"an object name is a str, not {name!r}")
    raw = name.encode()
    if not 0 < len(raw) <= wire.MAX_NAME or "/" in name or "\0" in name:
        raise ValueError(f"an object name is 1..255 bytes with no '/' or NUL, not {name!r}")
    return raw


_clients: weakref.WeakSet[Client] = weakref.WeakSet()
_shared: dict[tuple[int, str], Client] = {}


def connect(path: str | None = None) -> Client:
    """Connect to the daemon at ``path`` (default: $DEVANON_SOCKET, /run/devanon/...)."""
    return Client(path)


def shared_client(path: str) -> Client:
    """This process's one client for ``path`` (used when objects are unpickled); a new
    one once the daemon it talked to is gone (restarted, say)."""
    key = (os.getpid(), path)
    client = _shared.get(key)
    if client is None or client.gone:
        client = _shared[key] = Client(path)
    return client


def _reopen(
    path: str, name: str, writable: bool, identity: tuple[int, int] | None = None
) -> SharedAnon:
    """Open, in an unpickling process, the object a SharedAnon was pickled from: the same
    memfd (``identity``: its device and inode), not a newer object of the same name."""
    client = shared_client(path)
    try:
        shared = client.open(name, writable=writable)
    except BrokerError:  # (a connection's end shows when it is used: here, maybe first)
        if not client.gone:
            raise
        shared = shared_client(path).open(name, writable=writable)  # a new daemon's
    if identity is not None:
        shared._expect(identity, "that was pickled")
    return shared


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SharedAnon(Mapper):
    """A named object served by the daemon, mapped in this process; the methods of Anon.

    ``map_count``, ``resident_bytes`` and ``stats`` tell the object's state over all
    clients. Pickles by name: a worker process that unpickles it opens the same object.
    """

    def __init__(
        self,
        client: Client,
        name: str,
        handle: int,
        fd: int,
        size: int,
        page_size: int,
        writable: bool,
    ) -> None:
        self.client = client
        self.name = name
        self.fd = fd
        self.size = size
        self.page_size = page_size
        self.hugepages = False
        self._writable_fd = writable
        self._handle = handle
        self._generation = client.generation
        self._pin_failed = False
        """Set by a fork whose PIN the daemon did not make: the child drops its copies."""
        self.owner_uid = self.owner_gid = -1
        """Who owns the object: its creator's uid and primary gid (from OPEN's answer)."""
        self.mode = 0
        """The object's permission bits, as a file's (from OPEN's answer)."""
        self._chores = client.chores  # (one list, changed in place)
        self._init_books()
        forking.track(self)

    def map_count(self, offset: int) -> int:
        """How many times, over all clients, the page holding ``offset`` is mapped."""
        offset = _checks.integer("offset", offset)
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset:#x} is outside {self.name!r} (size {self.size:#x})")
        with self._lock:
            self._check_open()
            self._before_op()
            body, _ = self.client.call(wire.Op.COUNT, wire.COUNT.pack(self._handle, offset))
            (count,) = wire.U64.unpack(body)
            return int(count)

    def resident_bytes(self) -> int:
        """What the kernel holds for the object's memfd (``st_blocks``), once every unmap
        sent so far has been done."""
        with self._lock:
            self._check_open()
            self.flush()
            return os.fstat(self.fd).st_blocks * 512

    def flush(self) -> None:
        """Wait until the daemon has done every unmap sent so far (they are pipelined)."""
        with self._lock:
            self._check_open()
            self._before_op()
            self.client.call(wire.Op.SYNC)
            self.client.raise_late_errors()

    def stats(self) -> SharedStats:
        """The object's figures as the daemon keeps them, over all clients."""
        with self._lock:
            self._check_open()
            self._before_op()
            (info,) = self.client.stat(self.name)
            fields = SharedStats.__dataclass_fields__
            return SharedStats(**{k: v for k, v in info.items() if k in fields})

    def close(self) -> None:
        """Unmap everything, tell the daemon we let go, close the descriptor."""
        self._close(untrack=True)

    def __del__(self) -> None:
        """A SharedAnon dropped without ``close()`` gives its mappings back, as an Anon
        does: left mapped, they would outlive the counts the daemon drops when the
        connection goes, and their pages be punched under them."""
        with contextlib.suppress(Exception):  # also at interpreter exit, half torn down
            if not self.closed:
                self._close(untrack=False)  # (not in a fork hook's walk: see Anon.__del__)

    def _close(self, untrack: bool) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                self._unmap_all()
                if (
                    self._generation == self.client.generation
                    and self.client._pid > 0
                    and not self.client.gone
                ):
                    with self._unless_gone():  # gone: it let go of the handle already
                        self.client.call(wire.Op.CLOSE, wire.HANDLE.pack(self._handle))
            finally:
                os.close(self.fd)
                self.fd = -1
                if untrack:
                    forking.untrack(self)

    def __enter__(self) -> SharedAnon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        identity = None if self.closed else self._file_id
        return (_reopen, (self.client.path, self.name, self._writable_fd, identity))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self.fd}"
        return f"<devanon.SharedAnon {self.name!r} {self.size:#x} bytes, {state}>"

    # -- Mapper's hooks: the daemon keeps the counts --------------------------------------

    def _byte_ranges(self, ranges: list[PageRange]) -> list[tuple[int, int]]:
        ps = self.page_size
        return [(a * ps, (b - a) * ps) for a, b in ranges]

    def _map_counted(self, first: int, last: int, prot: int, offset: int) -> int:
        length = (last - first) * self.page_size
        return self.client.map_while(self._handle, offset, length, prot, self._mmap_shared)

    def _mmap_shared(self, length: int, prot: int, offset: int) -> int:
        try:
            return _libc.mmap(0, length, prot, _libc.MAP_SHARED, self.fd, offset)
        except OSError as e:
            raise self._mmap_error(e) from None

    def _lose_one(self, first: int, last: int) -> None:
        client = self.client
        if self._generation == client.generation and not client.gone:
            ps = self.page_size
            try:  # (the hot path: not _unless_gone, whose generator costs a microsecond)
                client.post_unmap(self._handle, first * ps, (last - first) * ps)
            except BrokerError:
                if not client.gone:
                    raise

    @contextlib.contextmanager
    def _unless_gone(self) -> Iterator[None]:
        """Telling the daemon of an unmap: a daemon gone has dropped this connection's
        counts already, so there is nothing to tell, and the unmapping goes on (stopped by
        the error, it left the rest mapped, for good)."""
        try:
            yield
        except BrokerError:
            if not self.client.gone:
                raise

    def _gain(self, ranges: list[PageRange]) -> None:
        if len(ranges) == 1:
            (first, last), ps = ranges[0], self.page_size
            self.client.map_one(self._handle, first * ps, (last - first) * ps)
            return
        done: list[bytes] = []
        try:
            for body in self._range_bodies(ranges):
                self.client.call(wire.Op.MAP, body)
                done.append(body)
        except BaseException:
            for body in done:  # all or nothing: give back what was counted
                self.client.post(wire.Op.UNMAP, body, wire.FLAG_NOREPLY)
            raise

    def _lose(self, ranges: list[PageRange]) -> None:
        if not ranges or self._generation != self.client.generation or self.client.gone:
            return
        if len(ranges) == 1:
            self._lose_one(*ranges[0])
        else:
            with self._unless_gone():
                for body in self._range_bodies(ranges):
                    self.client.post(wire.Op.UNMAP, body, wire.FLAG_NOREPLY)

    def _range_bodies(self, ranges: list[PageRange]) -> list[bytes]:
        """MAP/UNMAP/PIN bodies for ``ranges``, as many as the message size needs."""
        byte_ranges = self._byte_ranges(ranges)
        step = wire.MAX_RANGES
        return [
            wire.pack_ranges(self._handle, byte_ranges[i : i + step])
            for i in range(0, len(byte_ranges), step)
        ]

    def _before_op(self) -> None:
        if self._generation != self.client.generation or self.client._pid < 0:
            self._reopen_here()

    def _expect(self, identity: tuple[int, int], which: str) -> None:
        """Closed, and FileNotFoundError, unless this is the memfd ``identity`` (device,
        inode): opened by name again, it may be a newer object of the name."""
        if self._file_id != identity:
            self.close()
            raise FileNotFoundError(
                errno.ENOENT,
                f"{self.name!r} at {self.client.path} is not the object {which} (unlinked "
                "since, and a new one made under its name)",
            )

    def _reopen_here(self) -> None:
        """In a forked child: open the object again on this process's own connection: the
        same memfd, not a newer object of its name (unlinked since, and made again, maybe
        by another user)."""
        fresh = self.client.open(self.name, writable=self._writable_fd)
        fresh._expect(self._file_id, "this process inherited")
        os.close(self.fd)
        self.fd, fresh.fd = fresh.fd, -1
        self._handle = fresh._handle
        self._generation = self.client.generation
        forking.untrack(fresh)

    # -- fork ------------------------------------------------------------------------------

    def _prepare_fork(self, lifeline: int) -> None:
        """Just before fork: the daemon pins the pages the child will inherit until the
        child (which alone keeps the pipe's write end) and its descendants are gone.

        Before the fork, not after: this process killed in between would otherwise take
        its counts with it, and the daemon would punch the pages under the child. Should
        the fork fail, this process closes the write end and the pin goes at once.
        """
        super()._prepare_fork(lifeline)
        self._pin_failed = False
        try:
            pins = self._inherited_pages()
            if pins and lifeline < 0:
                raise OSError(errno.EMFILE, "no lifeline pipe could be made")
            for body in self._range_bodies(pins):
                self.client.call(wire.Op.PIN, body, [lifeline])
        except BaseException as e:  # nothing may leave a fork hook half done (an interrupt
            # is lost here); the daemon is gone, or refused: the child gets no copies
            log.warning("could not pin %r for a forked child (it gets no copies): %r", self.name, e)
            self._pin_failed = True

    def _forked(self, lifeline: int) -> None:
        """In the parent: pinned before the fork already."""
        os.close(lifeline)

    def _fork_child(self, pinned: bool) -> bool:
        """In the child: inherited pieces are the pin's (uncounted here); the rest is gone,
        and all of them if the pin could not be made."""
        kept = pinned and not self._pin_failed
        self._drop_uninherited(everything=not kept)
        for seg in self._segments:
            seg._counted = False
        return kept
