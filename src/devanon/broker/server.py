"""The daemon: named shared objects, counted per client, cleaned up when a client dies.

One thread, one ``selectors`` loop over SOCK_SEQPACKET connections: a message is a request,
so there is no framing to get wrong, and a request is handled to the end before the next
(the counts need no locks of their own; ``state_lock`` only keeps the metrics thread out).
A client is identified by SO_PEERCRED; it is gone when its socket closes or when its
``pidfd`` says the process exited (a forked copy of the socket cannot keep it alive).

Never trust the wire: a request that does not parse gets an EPROTO reply and changes
nothing; a client that keeps sending garbage, or stops reading replies, is cut off, and the
others go on.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import resource
import select
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from devanon.broker import protocol as wire
from devanon.broker import ring as rings
from devanon.broker.credentials import peer_groups
from devanon.broker.crowding import CrowdWatch
from devanon.broker.objects import READ, WRITE, SharedObject, no_such
from devanon.broker.received import Closer, check_lifeline
from devanon.broker.verify import add_maps_of, pipes_written_by
from devanon.counts import MapCounts

log = logging.getLogger("devanon.broker")

MAX_ERRORS = 16
"""Protocol errors a client may make before it is cut off."""
MAX_SIZE = 1 << 46
"""The largest object (64 TiB): counts are sparse, but the memfd's size is a promise."""
MAX_RINGS_PER_UID = 256
"""Request rings one uid may hold (16 KiB of the daemon's memory each). Root is not held."""
MAX_OBJECTS_PER_UID = 1024
"""Objects one uid may own (unlinked ones count while in use): each holds a descriptor of
the daemon's, and one user must not use up the daemon for the others. Root is not held."""
MAX_CONNECTIONS_PER_UID = 1024
"""Connections one uid may hold (two descriptors of the daemon's each: the socket and a
pidfd). Root is not held."""
MAX_PINS_PER_UID = 4096
"""Pins one uid may hold (one descriptor each: its lifeline). Root is not held."""
MAX_HANDLES = 16384
"""Handles one connection may hold open (each OPEN makes one: the daemon's memory)."""


class DaemonRunning(OSError):
    """Another daemon answers on the socket."""


@dataclass(eq=False)
class Peer:
    """One connected client."""

    id: int
    sock: socket.socket
    pid: int
    uid: int
    gid: int
    gids: set[int]
    pidfd: int
    handles: dict[int, SharedObject] = field(default_factory=dict)
    next_handle: int = 1
    errors: int = 0
    ring: rings.DaemonRing | None = None
    ring_used: float = 0.0
    """When the daemon last found requests in the ring (``time.monotonic``)."""
    wake_owed: bool = False
    """A ring reply went to a client asleep waiting for one: a WAKE is sent when the pass
    over its ring is done (one a pass, however many replies)."""
    refused_maps: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    """The last one-range MAPs refused (``_REFUSALS_KEPT``), oldest first: seq -> (handle,
    offset, length). A give-back of one of them (the same seq and range) is dropped
    (``wire.FLAG_GIVE_BACK``); a MAP said yes to under a seq used again clears it."""


def default_socket_path(*, make_private: bool = True) -> str:
    """$DEVANON_SOCKET, else /run/devanon/devanon.sock as root, else under XDG_RUNTIME_DIR,
    else under /tmp/devanon-UID (made, or checked, to be this user's alone unless told
    not to: ``make_private=False`` only names it)."""
    if os.environ.get("DEVANON_SOCKET"):
        return os.environ["DEVANON_SOCKET"]
    if os.geteuid() == 0:
        return "/run/devanon/devanon.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        runtime = f"/tmp/devanon-{os.geteuid()}"
        if make_private:
            _private_directory(runtime)
    return os.path.join(runtime, "devanon.sock")


SOCKET_PATH_MAX = 107
"""Bytes a Unix socket's path may have: ``sun_path`` (108) less its NUL (unix(7))."""


def checked_socket_path(path: str) -> str:
    """``path``, if a Unix socket can have it; else ValueError naming it (Python's own
    error, "AF_UNIX path too long", names neither the path nor the limit)."""
    if not isinstance(path, str):
        raise TypeError(f"socket path must be a str, not {type(path).__name__}: {path!r}")
    size = len(os.fsencode(path))
    if size > SOCKET_PATH_MAX or not path or "\0" in path:
        why = f"{size} bytes, over {SOCKET_PATH_MAX}" if size > SOCKET_PATH_MAX else "empty or NUL"
        raise ValueError(
            f"socket path {path!r} cannot be a Unix socket's ({why}): choose a shorter one, "
            "e.g. with DEVANON_SOCKET"
        )
    return path


def _private_directory(path: str) -> str:
    """``path``, made a directory of this user's alone (0700) unless it is one already.
    Anyone may create a name in /tmp first: a directory someone else owns, or a symlink,
    is refused (tmux checks its /tmp/tmux-UID the same way)."""
    uid = os.geteuid()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours (an older devanon made it 0755): ours alone now
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise PermissionError(
            errno.EACCES,
            f"{path} is not a directory of uid {uid}'s alone (owner uid {st.st_uid}, mode "
            f"{stat.filemode(st.st_mode)}): remove it, or set XDG_RUNTIME_DIR or "
            "DEVANON_SOCKET",
        )
    return path


class Daemon:
    """Serves named objects on a Unix socket until ``stop()`` or SIGTERM/SIGINT."""

    def __init__(
        self,
        path: str,
        *,
        socket_mode: int = 0o600,
        socket_group: str | None = None,
        spin: float = 200e-6,
    ) -> None:
        self.path = path
        self.spin = spin
        self.objects: dict[str, SharedObject] = {}
        self.unlinked: set[SharedObject] = set()
        self.peers: dict[int, Peer] = {}
        self._ring_peers: dict[int, Peer] = {}
        """Peers with a request ring."""
        self._polled: dict[int, Peer] = {}
        """Peers whose rings the loop polls while it spins (their requests need no WAKE):
        those that used them lately. The others' rings say the daemon sleeps."""
        self.state_lock = threading.Lock()
        self._crowd = CrowdWatch()
        self.naps = 0
        """Naps taken between looks at the rings, the CPUs being crowded (a metric)."""
        self._next_peer = 1
        self._stop = False
        self._epoll = select.epoll()
        self._epoll_fd = self._epoll.fileno()
        self._ready: dict[int, Callable[[], None]] = {}
        """What to do when a descriptor is readable: accept, read a client, a death."""
        self._unwatched: set[int] = set()
        """Descriptors unwatched while handling the current batch of events: a later
        event of the batch for one of these numbers is stale (a descriptor accepted
        meanwhile may have the number now)."""
        self._buf = bytearray(wire.MAX_MESSAGE + 1)
        self._view = memoryview(self._buf)
        gid = None if socket_group is None else _group_id(socket_group)  # before the bind
        self._listener, self._bound = self._listen(path, socket_mode, gid)
        """``_bound``: the socket file we bound (device, inode): the one to unlink when we
        stop, not one another daemon may have bound there since."""
        self._reserve = -1
        """A descriptor held back for ``_turn_away`` (-1: none at the moment)."""
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        self._sweeping: list[SharedObject] = []
        """The objects the sweep has still to walk in this round, the next last."""
        self._verify_rations: dict[int, Ration] = {}
        """Uid -> the daemon's time its VERIFYs may still take (root is not held)."""
        self._closer = Closer()
        """Closes what clients sent and the daemon does not keep (a close can block)."""
        self._hold_reserve()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._watch(self._listener.fileno(), self._accept)
        self._watch(self._wake_r.fileno(), self._woken)
        self._handlers: dict[wire.Op, Callable[[Peer, wire.Request, list[int]], Reply]] = {
            wire.Op.OPEN: self._open,
            wire.Op.MAP: self._map,
            wire.Op.UNMAP: self._unmap,
            wire.Op.CLOSE: self._close,
            wire.Op.UNLINK: self._unlink,
            wire.Op.STAT: self._stat,
            wire.Op.VERIFY: self._verify,
            wire.Op.PIN: self._pin,
            wire.Op.COUNT: self._count,
            wire.Op.SYNC: self._sync,
            wire.Op.RING: self._ring,
            wire.Op.WAKE: self._wake,
        }

    # -- life ------------------------------------------------------------------------------

    @staticmethod
    def _listen(path: str, mode: int, gid: int | None) -> tuple[socket.socket, tuple[int, int]]:
        """The listening socket, and the (device, inode) of its file. Listening comes
        right after the bind: a socket nobody listens on looks stale to another daemon
        starting meanwhile, which would replace it."""
        checked_socket_path(path)
        _raise_descriptor_limit()
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            old_umask = os.umask(0o177)  # the owner's alone until its rights are set
            try:
                sock.bind(path)
                st = os.lstat(path)
                sock.listen(128)
            finally:
                os.umask(old_umask)
            bound = (st.st_dev, st.st_ino)
            _set_socket_rights(path, bound, mode, gid)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock, bound

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop cleanly (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def close(self) -> None:
        """Let go of everything without serving (a start that failed after the bind)."""
        self._shutdown()

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def serve_forever(self) -> None:
        """Serve until stopped. After each request the loop polls without sleeping for
        ``spin`` seconds: a sleeping process takes ~100 us to wake on a virtual machine, more
        than a whole request costs, so a busy daemon stays awake and an idle one sleeps.

        While other processes could use every CPU (``devanon.broker.crowding``) polling
        would take a CPU from them, its clients among them: then a pass that finds nothing
        dozes (``_give_way``), the loop polls for at most ``_CROWDED_SPIN`` after a
        request, and after that naps (``_NAP`` at a time, waking for any message) and
        looks at the rings it polls between naps, for up to ``_NAPPING``, before it sleeps
        until a client rings the doorbell."""
        spin, last, passes = self.spin, 0.0, 0
        try:
            while not self._stop:
                served = bool(self._polled) and self._serve_rings()
                now = time.monotonic()
                if served:
                    last = now
                if now >= self._next_sweep:
                    self._sweep_uncounted(now)
                passes += 1
                try:
                    idle = now - last
                    crowded = bool(spin) and self._crowd.crowded(now)
                    polls = idle < (min(spin, _CROWDED_SPIN) if crowded else spin)
                    if polls or (crowded and idle < _NAPPING and self._polled):  # never: spin 0
                        if self._polled and passes % _RING_PASSES and polls:
                            if not served and self._give_way(crowded):
                                passes = -1  # a message came meanwhile: the sockets next
                            continue  # the rings first: look at the sockets now and then
                        if self._polled:
                            self._stop_polling_idle(now)
                        if not polls:
                            self.naps += 1
                        events = self._epoll.poll(0 if polls else _NAP)
                        if not events and not served and polls and self._give_way(crowded):
                            passes = -1
                    else:
                        events = self._sleep()
                except InterruptedError:
                    continue
                if events:
                    last = time.monotonic()
                    self._unwatched.clear()
                for fd, _ in events:
                    if fd in self._unwatched:
                        continue  # its watch ended in this batch: the number may be reused
                    action = self._ready.get(fd)
                    if action is not None:
                        with self.state_lock:
                            self._run(fd, action)
        finally:
            self._shutdown()

    def _give_way(self, crowded: bool) -> bool:
        """A pass of the polling loop found nothing: let a process waiting for a CPU have
        this one. ``sched_yield`` does that only within the daemon's own scheduling group
        (``devanon.broker.crowding``), so while other processes could use every CPU the
        loop dozes instead: it waits up to ``_DOZE`` for a message (``select`` on the
        epoll descriptor: a socket client, a doorbell or a new connection ends the doze),
        which hands the CPU to whoever waits for it. True if a message came.

        Measured in side-by-side runs (2 CPUs, the daemon a group of its own). 8 spawned
        clients that compute ~140 us before each pair made more iterations in 4 pairs of
        runs of 5 (5,800-7,200 against 5,700-6,300; the fifth 5,100 against 6,100). 8
        clients mapping and unmapping in a loop: the daemon's CPU a pair fell by about a
        fifth (spawned: 43-49 us against 51-63), the pairs stayed within this machine's
        noise (spawned 14,500-16,500 against 12,600-17,700; forked 20,300-23,400 against
        18,400-24,700): those clients spend what it leaves waiting for its replies.
        Dozing 10, 100 or 300 us made no more pairs than 30. A doze asked for 30 us takes
        about 100 us on a busy machine: the timer's slack of 50 us, then the wait for the
        CPU (median 99 us beside 3 spinners).
        """
        if not crowded:
            os.sched_yield()
            return False
        return bool(select.select([self._epoll_fd], [], [], _DOZE)[0])

    def _sweep_uncounted(self, now: float) -> None:
        """Punch data in pages nobody counts, in every object (``SharedObject.sweep``),
        each ``SWEEP_EVERY_S``: in slices of ``_SWEEP_SLICE`` at most, ``_SWEEP_GAP``
        apart, so that it never holds the clients up for long."""
        if not self._sweeping:
            self._sweeping = list(self._all_objects())
        with self.state_lock:
            while self._sweeping:
                obj = self._sweeping[-1]
                try:
                    if obj.fd >= 0 and not obj.sweep(now + _SWEEP_SLICE):
                        break  # on at the next slice
                except OSError as e:  # not this object's turn, but the loop goes on
                    log.warning("sweeping %r: %s", obj.name, e)
                self._sweeping.pop()
        # From the slice's end: a slice that ran long still leaves the loop its gap.
        self._next_sweep = time.monotonic() + (_SWEEP_GAP if self._sweeping else SWEEP_EVERY_S)

    def _sleep(self) -> list[tuple[int, int]]:
        """Wait for a descriptor, once the polled rings know that requests now need a WAKE.
        A second with nothing at all: look at every ring anyway."""
        if self._polled and not self._stop_polling(list(self._polled.values())):
            return []  # requests came meanwhile
        events = self._epoll.poll(1.0)
        if not events:
            for peer in _with_requests(self._ring_peers.values()):
                self._poll_ring(peer)
        return events

    def _poll_ring(self, peer: Peer) -> None:
        """Poll ``peer``'s ring from now on (its requests need no WAKE)."""
        assert peer.ring is not None
        peer.ring.sleep(False)
        peer.ring_used = time.monotonic()
        self._polled[peer.id] = peer

    def _stop_polling(self, peers: list[Peer]) -> bool:
        """Tell these rings that the daemon sleeps (their requests need a WAKE), then look
        at them once more, after a fence (see ``devanon.broker.ring``): False if one had
        requests (it is polled again)."""
        for peer in peers:
            assert peer.ring is not None
            peer.ring.sleep(True)
            del self._polled[peer.id]
        rings.fence()
        ready = _with_requests(peers)
        for peer in ready:
            self._poll_ring(peer)
        return not ready

    def _stop_polling_idle(self, now: float) -> None:
        """Stop polling the rings unused for ``_RING_IDLE`` seconds: polling costs the
        loop time for every ring, and an idle client can ring the doorbell."""
        idle = [p for p in self._polled.values() if now - p.ring_used > _RING_IDLE]
        if idle:
            self._stop_polling(idle)

    def _serve_rings(self) -> bool:
        """Serve every polled ring with requests in it; False if none had any."""
        ready = _with_requests(self._polled.values())
        if not ready:
            return False
        with self.state_lock:
            self._serve_each(ready)
        return True

    def _drain_rings(self) -> None:
        """Serve what every ring holds (before a figure over all clients: the lock is held)."""
        self._serve_each(_with_requests(self._ring_peers.values()))

    def _serve_each(self, peers: list[Peer]) -> None:
        """Serve these peers' rings (the lock is held), each under ``_run``'s safety net
        (written out here: the hot path)."""
        now = time.monotonic()
        for peer in peers:
            if peer.ring is not None:  # not cut off meanwhile
                peer.ring_used = now
                try:
                    self._serve_ring(peer)
                except Exception:
                    log.exception("serving client %d's ring (pid %d) failed", peer.id, peer.pid)
                    if self.peers.get(peer.id) is peer:
                        with contextlib.suppress(Exception):
                            self._disconnect(peer)

    def _serve_ring(self, peer: Peer) -> None:
        """Handle the requests in a peer's ring, in order (the lock is held)."""
        assert peer.ring is not None
        try:
            taken = peer.ring.take()
        except rings.RingError as e:
            log.warning("client %d (pid %d) cut off: %s", peer.id, peer.pid, e)
            self._disconnect(peer)
            return
        for op, flags, seq, handle, offset, length in taken:
            if op in _FAST_OPS:
                self._one_range(peer, op, flags, seq, handle, offset, length, peer.ring)
            else:
                self._protocol_error(peer, op, seq, f"op {op} does not go through a ring")
            if peer.ring is None:  # cut off
                return
        if peer.wake_owed:
            peer.wake_owed = False
            self._send_wake(peer)

    def _run(self, fd: int, action: Callable[[], None]) -> None:
        """Run what a readable descriptor calls for. A bug there must not take the daemon
        (and everyone's counts) down: it is logged, and the client it concerns is cut off
        (its counts dropped, as if it had died: it would wait for a reply forever); a
        lifeline is no longer watched (its pin stays: nothing is punched under a child)."""
        try:
            action()
        except Exception:
            log.exception("handling descriptor %d failed", fd)
            if fd in (self._listener.fileno(), self._wake_r.fileno()):
                return  # keep serving: _accept and _woken handle their own errors
            owner = next((p for p in self.peers.values() if fd in (p.sock.fileno(), p.pidfd)), None)
            with contextlib.suppress(Exception):
                if owner is not None:
                    self._disconnect(owner)
                else:
                    self._unwatch(fd)

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(64)

    def _watch(self, fd: int, action: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._ready[fd] = action

    def _unwatch(self, fd: int) -> None:
        if self._ready.pop(fd, None) is not None:
            self._unwatched.add(fd)
            self._epoll.unregister(fd)

    def _shutdown(self) -> None:
        """Let go of everything, punching nothing: the clients' mappings and descriptors
        stay valid, with their data, and the kernel frees each memfd when its last
        client lets go."""
        for peer in list(self.peers.values()):
            self._disconnect(peer, drop_counts=False)
        for obj in [*self.objects.values(), *self.unlinked]:
            obj.close()
        self.objects.clear()
        self.unlinked.clear()
        self._epoll.close()
        self._listener.close()
        if self._reserve >= 0:
            os.close(self._reserve)
        self._wake_r.close()
        self._wake_w.close()
        self._closer.stop()
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:  # not another daemon's, bound since
                os.unlink(self.path)

    # -- events ----------------------------------------------------------------------------

    def _accept(self) -> None:
        if self._reserve < 0:  # lost at a turn-away: take it back once there is room
            self._hold_reserve()
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as e:  # EMFILE, ENFILE, ENOMEM: refuse this one, go on serving the rest
            log.warning("cannot accept a client: %s", e.strerror)
            self._turn_away()
            return
        sock.setblocking(False)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        held = sum(p.uid == uid for p in self.peers.values())
        if uid != 0 and held >= MAX_CONNECTIONS_PER_UID:
            log.warning(
                "client pid %d refused: uid %d holds %d connections, the most the daemon "
                "keeps for one user",
                pid,
                uid,
                held,
            )
            sock.close()
            return
        try:
            groups = peer_groups(sock, pid, gid)
            pidfd = _peer_pidfd(sock, pid)
        except OSError as e:
            log.warning("cannot take client pid %d: %s", pid, e.strerror)
            sock.close()  # gone already, most likely
            return
        peer = Peer(self._next_peer, sock, pid, uid, gid, groups, pidfd)
        self._next_peer += 1
        self.peers[peer.id] = peer
        try:
            self._watch(sock.fileno(), lambda: self._receive(peer))
            self._watch(pidfd, lambda: self._disconnect(peer))
        except OSError as e:  # ENOSPC (fs.epoll.max_user_watches), ENOMEM: refuse this one
            log.warning("cannot watch client pid %d: %s", pid, e.strerror)
            self._disconnect(peer)
            return
        log.info("client %d: pid %d uid %d", peer.id, pid, uid)

    def _turn_away(self) -> None:
        """Out of descriptors: close the one held in reserve, take the waiting connection
        and close it (the client reads EOF), then hold one in reserve again. The listener
        would otherwise stay readable and the loop spin on it. With no reserve to give
        (it could not be taken back), or nothing gained by it, the loop waits a little."""
        taken = False
        if self._reserve >= 0:
            fd, self._reserve = self._reserve, -1
            os.close(fd)
            with contextlib.suppress(OSError):
                self._listener.accept()[0].close()
                taken = True
            self._hold_reserve()
        if not taken:
            time.sleep(0.01)  # ENFILE, ENOMEM, no reserve: don't spin on the listener

    def _hold_reserve(self) -> None:
        """Open the descriptor ``_turn_away`` gives up, if there is room for it."""
        with contextlib.suppress(OSError):
            self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _receive(self, peer: Peer) -> None:
        """Read and handle what the client sent, a few messages per wake-up. Before each
        message, what the client's ring holds: it was written before the message was sent
        (a client writes nothing to its ring while a message it posted may be unread). A
        message (a WAKE, say) makes the daemon poll the client's ring again."""
        if peer.ring is not None and peer.id not in self._polled:
            self._poll_ring(peer)
        sock, buf = peer.sock, self._buf
        for _ in range(_BATCH):
            try:
                n, ancillary, flags, _ = sock.recvmsg_into([buf], _EVERY_DESCRIPTOR)
            except BlockingIOError:
                return
            except OSError:
                self._disconnect(peer)
                return
            if peer.ring is not None and peer.ring.pending():
                self._serve_ring(peer)
                if peer.id not in self.peers:
                    return
            if n == _FAST_SIZE and not ancillary and buf[0] in _FAST_OPS:
                op, mflags, seq, handle, offset, length = wire.MAP_ONE.unpack_from(buf)
                if self._one_range(peer, op, mflags, seq, handle, offset, length, None):
                    return  # answered: a MAP's client sends nothing more till it reads this
                    # (epoll is level-triggered: whatever else it sent wakes us again)
                continue
            fds = wire.descriptors(ancillary)
            if n == 0 and not fds:
                self._disconnect(peer)
                return
            if fds and self._closer.backlog > _CLOSE_BACKLOG:  # their closes wait
                self._closer.close(fds)
                log.warning(
                    "client %d (pid %d) cut off: it sends files whose close waits",
                    peer.id,
                    peer.pid,
                )
                self._disconnect(peer)
                return
            if flags & _TRUNCATED or n > wire.MAX_MESSAGE or len(fds) > wire.MAX_FDS:
                self._closer.close(fds)
                self._truncated(peer, n, flags, len(fds))
            else:
                try:
                    req = wire.parse_request(bytes(self._view[:n]))
                except wire.ProtocolError as e:
                    self._closer.close(fds)
                    self._protocol_error(peer, *self._op_and_seq(n), str(e))
                else:
                    self._handle(peer, req, fds)
            if peer.id not in self.peers:
                return

    def _one_range(
        self,
        peer: Peer,
        op: int,
        flags: int,
        seq: int,
        handle: int,
        offset: int,
        length: int,
        ring: rings.DaemonRing | None,
    ) -> bool:
        """The hot path: MAP or UNMAP of one range, from the socket or from ``ring``.
        Returns True if it replied.

        A MAP is answered as soon as it is known to be valid (counting it cannot fail),
        so the client's wait does not include the bookkeeping. Nothing runs between the
        yes and the count: a yes that cannot be sent, or finds no room in the ring, cuts
        the client off without it, and a WAKE is sent only after the pass
        (``_serve_ring``)."""
        obj = peer.handles.get(handle)
        try:
            if flags & wire.FLAG_GIVE_BACK:  # (before the handle: a MAP refused for it too)
                if op != wire.Op.UNMAP or not flags & wire.FLAG_NOREPLY:
                    raise ValueError(_GIVE_BACK_RULE)
                if peer.refused_maps.get(seq) == (handle, offset, length):
                    del peer.refused_maps[seq]  # that MAP was refused: nothing to give back
                    return False
            if obj is None:
                raise ValueError(f"no open handle {handle}")
            first, last = obj.page_range(offset, length)
            if op == wire.Op.MAP:
                obj.room_for(peer.id, 1)
                self._answer(peer, op, seq, ring)
                if peer.id in self.peers:  # not cut off by the answer
                    obj.map_one(peer.id, first, last)
                    if peer.refused_maps:  # a seq used again names this MAP from now on
                        peer.refused_maps.pop(seq, None)
                return True
            obj.unmap_one(peer.id, first, last)
        except (ValueError, OSError) as e:
            if op == wire.Op.MAP:
                peer.refused_maps[seq] = (handle, offset, length)
                if len(peer.refused_maps) > _REFUSALS_KEPT:
                    del peer.refused_maps[next(iter(peer.refused_maps))]
            if isinstance(e, ValueError):
                self._refuse(peer, op, flags, seq, errno.EINVAL, str(e), ring)
            else:
                self._refuse(peer, op, flags, seq, e.errno or errno.EIO, e.strerror or str(e), ring)
            return True
        if not flags & wire.FLAG_NOREPLY:
            self._answer(peer, op, seq, ring)
            return True
        return False

    def _answer(self, peer: Peer, op: int, seq: int, ring: rings.DaemonRing | None) -> None:
        """Say yes to a one-range request, where it came from."""
        if ring is None:
            self._send(peer, wire.REPLY.pack(op, wire.STATUS_OK, seq))
        else:
            self._ring_reply(peer, ring, op, wire.STATUS_OK, seq)

    def _refuse(
        self,
        peer: Peer,
        op: int,
        flags: int,
        seq: int,
        code: int,
        text: str,
        ring: rings.DaemonRing | None,
    ) -> None:
        """Refuse a one-range request. The error and its text go on the socket; a ring
        request that wants an answer also gets an error status in the ring, after it."""
        self._send(peer, wire.error(op, seq, code, text))
        if ring is not None and not flags & wire.FLAG_NOREPLY and peer.ring is ring:
            self._ring_reply(peer, ring, op, wire.STATUS_ERROR, seq)

    def _ring_reply(
        self, peer: Peer, ring: rings.DaemonRing, op: int, status: int, seq: int
    ) -> None:
        """Post a reply in the ring; if the client sleeps waiting for one, it is owed a
        WAKE, sent once the pass over the ring is done (``_serve_ring``)."""
        wake = ring.reply(op, status, seq)
        if wake is None:
            log.warning("client %d (pid %d) cut off: it reads no ring replies", peer.id, peer.pid)
            self._disconnect(peer)
        elif wake:
            peer.wake_owed = True

    def _send_wake(self, peer: Peer) -> None:
        """Wake a client asleep on its socket for a ring reply. A socket with no room
        for the WAKE is no error: the client has messages there it has not read, and
        the first of them wakes it (it then looks at the ring)."""
        try:
            peer.sock.send(_WAKE_REPLY)
        except BlockingIOError:
            pass
        except OSError:  # gone
            self._disconnect(peer)

    def _handle(self, peer: Peer, req: wire.Request, fds: list[int]) -> None:
        err: tuple[int, str] | None = None
        reply = Reply()
        try:
            if fds and req.op != wire.Op.PIN:
                raise wire.ProtocolError(f"{req.op.name} carries no descriptor (only PIN does)")
            reply = self._handlers[req.op](peer, req, fds)
        except (wire.ProtocolError, struct.error, UnicodeDecodeError) as e:
            err = (errno.EPROTO, str(e))
            peer.errors += 1
        except PermissionError as e:  # EACCES, or EPERM (UNLINK by a reader not the owner)
            err = (e.errno or errno.EACCES, e.strerror or str(e))
        except OSError as e:
            err = (e.errno or errno.EIO, e.strerror or str(e))
        except ValueError as e:
            err = (errno.EINVAL, str(e))
        except Exception as e:  # a bug must not take the daemon (and everyone's counts) down
            log.exception("request %s from client %d failed", req.op.name, peer.id)
            err = (errno.EIO, f"internal error: {e}")
        finally:  # (a client's descriptor may take long to close: not in this thread)
            self._closer.close(fd for fd in fds if fd not in reply.kept)
        if err is not None:
            self._send(peer, wire.error(req.op, req.seq, *err))
            if peer.errors > MAX_ERRORS:
                self._disconnect(peer)
        elif wire.REPLY.size + len(reply.body) > wire.MAX_MESSAGE:  # STAT of all, VERIFY
            remedy = (
                "ask for one object by name, or list them in pages (FLAG_AFTER)"
                if req.op == wire.Op.STAT
                else "list the differences in pages (FLAG_AFTER)"
            )
            text = (
                f"the reply would be {len(reply.body)} bytes, over the {wire.MAX_MESSAGE} a "
                f"message holds: {remedy}"
            )
            self._send(peer, wire.error(req.op, req.seq, errno.EMSGSIZE, text))
        elif not (
            req.op == wire.Op.WAKE or (req.op == wire.Op.UNMAP and req.flags & wire.FLAG_NOREPLY)
        ):
            self._send(peer, wire.ok(req.op, req.seq, reply.body), reply.fds)
        for fd in reply.fds:
            os.close(fd)

    def _truncated(self, peer: Peer, n: int, flags: int, nfds: int) -> None:
        """Refuse a message that was too long (the buffer holds one byte more than the
        limit, so the kernel cuts it short or it fills the buffer), or the kernel cut the
        descriptors of: too many, or no room for them in the daemon (at its descriptor
        limit: not the client's fault). The reply names the request, so its caller wakes."""
        op, seq = self._op_and_seq(n)
        if flags & socket.MSG_TRUNC or n > wire.MAX_MESSAGE:
            self._protocol_error(peer, op, seq, f"message over {wire.MAX_MESSAGE} bytes")
        elif nfds > wire.MAX_FDS:
            self._protocol_error(peer, op, seq, f"more than {wire.MAX_FDS} descriptors")
        else:
            log.warning("client %d: descriptors dropped, the daemon is out of them", peer.id)
            self._send(
                peer,
                wire.error(
                    op,
                    seq,
                    errno.EMFILE,
                    "the daemon is out of file descriptors and could not take the ones this "
                    "request carried; nothing was done",
                ),
            )

    def _op_and_seq(self, n: int) -> tuple[int, int]:
        """The op and seq of the ``n``-byte message in the buffer, for its refusal (0 for
        what did not arrive)."""
        if n >= wire.HEADER.size:
            op, _, seq = wire.HEADER.unpack_from(self._buf)
            return op, seq
        return (self._buf[0] if n else 0), 0

    def _protocol_error(self, peer: Peer, op: int, seq: int, message: str) -> None:
        peer.errors += 1
        self._send(peer, wire.error(op, seq, errno.EPROTO, message))
        if peer.errors > MAX_ERRORS and peer.id in self.peers:
            log.warning("client %d (pid %d) cut off: %s", peer.id, peer.pid, message)
            self._disconnect(peer)

    def _send(self, peer: Peer, data: bytes, fds: list[int] | None = None) -> None:
        if peer.id not in self.peers:
            return
        try:
            if fds:
                socket.send_fds(peer.sock, [data], fds)
            else:
                peer.sock.send(data)
        except OSError:  # gone, or not reading its replies (EAGAIN): cut off, never wait
            self._disconnect(peer)

    def _disconnect(self, peer: Peer, *, drop_counts: bool = True) -> None:
        if self.peers.pop(peer.id, None) is None:
            return
        for obj in self._all_objects():
            if drop_counts:
                obj.drop(peer.id)
            obj.handles.pop(peer.id, None)
        peer.handles.clear()
        self._unwatch(peer.sock.fileno())
        self._unwatch(peer.pidfd)
        self._drop_ring(peer)
        self._closer.close([peer.sock.detach()])  # (messages queued in it may carry files)
        os.close(peer.pidfd)
        self._forget_unused()
        if drop_counts:
            log.info("client %d (pid %d) gone; its counts dropped", peer.id, peer.pid)

    def _drop_ring(self, peer: Peer) -> None:
        if peer.ring is not None:
            self._ring_peers.pop(peer.id, None)
            self._polled.pop(peer.id, None)
            peer.ring.close()
            peer.ring = None

    def _all_objects(self) -> list[SharedObject]:
        return [*self.objects.values(), *self.unlinked]

    def _forget_unused(self) -> None:
        for obj in [o for o in self.unlinked if not o.in_use]:
            self.unlinked.discard(obj)
            obj.close()

    # -- requests --------------------------------------------------------------------------

    def _object(self, peer: Peer, handle: int) -> SharedObject:
        obj = peer.handles.get(handle)
        if obj is None:
            raise ValueError(f"no open handle {handle}")
        return obj

    def _open(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        size, mode, flags = wire.OPEN.unpack_from(req.body)
        name = wire.name_of(req.body[wire.OPEN.size :])
        writable = bool(flags & wire.OPEN_WRITABLE)
        if len(peer.handles) >= MAX_HANDLES:  # first: a refused OPEN creates nothing
            raise OSError(
                errno.EMFILE,
                f"this connection holds {len(peer.handles)} handles open, the most the daemon "
                f"keeps for one: close some before opening {name!r}",
            )
        obj = self.objects.get(name)
        if obj is not None and flags & wire.OPEN_CREATE and flags & wire.OPEN_EXCLUSIVE:
            raise FileExistsError(errno.EEXIST, f"{name!r} exists (an exclusive create)")
        if obj is None:
            if not flags & wire.OPEN_CREATE:
                raise no_such(name)
            if not 0 < size <= MAX_SIZE or size % os.sysconf("SC_PAGE_SIZE"):
                raise ValueError(
                    f"size {size} of a new object {name!r} is not a positive "
                    "multiple of the page size up to 64 TiB"
                )
            if mode & ~0o777:
                raise ValueError(f"mode {mode:#o} has bits beyond 0o777")
            owned = sum(o.uid == peer.uid for o in self._all_objects())
            if peer.uid != 0 and owned >= MAX_OBJECTS_PER_UID:
                gone = sum(o.uid == peer.uid for o in self.unlinked)  # STAT does not list them
                raise OSError(
                    errno.EDQUOT,
                    f"uid {peer.uid} owns {owned} objects already ({gone} of them unlinked but "
                    "still open or mapped), the most the daemon keeps for one user: unlink "
                    f"or let go of some before creating {name!r}",
                )
            owner = SharedObject.rights(peer.uid, peer.uid, peer.gid, peer.gids, mode)
            if owner & (READ | (WRITE if writable else 0)) != READ | (WRITE if writable else 0):
                raise PermissionError(
                    errno.EACCES, f"mode {mode:04o} would not let its creator open {name!r}"
                )
            new = SharedObject(name, size, peer.uid, peer.gid, mode)
            try:
                fd = new.descriptor(writable)  # EMFILE here: nothing was made
            except BaseException:
                new.close()
                raise
            self.objects[name] = new
            log.info("client %d created %r (%d bytes, mode %04o)", peer.id, name, size, mode)
            return self._opened(peer, new, fd)
        want = READ | (WRITE if writable else 0)
        if not obj.allows(peer.uid, peer.gids, want):
            if obj.allows(peer.uid, peer.gids, READ):  # it may see the mode (STAT shows it)
                why = f"write {name!r} (mode {obj.mode:04o}, owner uid {obj.uid})"
            else:
                why = f"read {name!r}"
            raise PermissionError(errno.EACCES, f"uid {peer.uid} may not {why}")
        if size and size != obj.size:  # after the rights: the size is not for everyone
            raise ValueError(f"{name!r} exists with size {obj.size}, not {size}")
        return self._opened(peer, obj, obj.descriptor(writable))  # EMFILE: nothing changed

    @staticmethod
    def _opened(peer: Peer, obj: SharedObject, fd: int) -> Reply:
        """A new handle of ``obj`` for ``peer``, and the reply carrying ``fd``."""
        handle = peer.next_handle
        peer.next_handle += 1
        peer.handles[handle] = obj
        obj.handles[peer.id] = obj.handles.get(peer.id, 0) + 1
        body = wire.OPENED.pack(handle, obj.size, obj.page_size, obj.uid, obj.gid, obj.mode)
        return Reply(body, [fd])

    def _map(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        if req.flags & wire.FLAG_GIVE_BACK:
            raise ValueError(_GIVE_BACK_RULE)
        handle, ranges = wire.unpack_ranges(req.body)
        obj = self._object(peer, handle)
        pages = obj.pages(ranges)
        obj.room_for(peer.id, len(pages))
        obj.map(peer.id, pages)
        return Reply()

    def _unmap(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        if req.flags & wire.FLAG_GIVE_BACK:  # (one range comes by _one_range)
            raise ValueError(_GIVE_BACK_RULE)
        handle, ranges = wire.unpack_ranges(req.body)
        obj = self._object(peer, handle)
        obj.unmap(peer.id, obj.pages(ranges))
        return Reply()

    def _close(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        (handle,) = wire.HANDLE.unpack(req.body)
        obj = self._object(peer, handle)
        del peer.handles[handle]
        left = obj.handles.get(peer.id, 1) - 1
        if left:
            obj.handles[peer.id] = left
        else:
            obj.handles.pop(peer.id, None)
            obj.drop(peer.id)
        self._forget_unused()
        return Reply()

    def _unlink(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        name = wire.name_of(req.body)
        obj = self.objects.get(name)
        if obj is None or not obj.allows(peer.uid, peer.gids, READ):
            raise no_such(name)
        if peer.uid not in (0, obj.uid):
            raise PermissionError(
                errno.EPERM, f"only the owner (uid {obj.uid}) or root may unlink {name!r}"
            )
        del self.objects[name]
        obj.unlinked = True
        self.unlinked.add(obj)
        self._forget_unused()
        return Reply()

    def _stat(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        self._drain_rings()
        if req.flags & wire.FLAG_AFTER:
            return self._stat_page(peer, wire.name_of(req.body) if req.body else "")
        if req.body:
            name = wire.name_of(req.body)
            obj = self.objects.get(name)
            if obj is None or not obj.allows(peer.uid, peer.gids, READ):
                raise no_such(name)
            return Reply(f"[{self._described_within(obj, _LIST_ROOM)}]".encode())
        readable = [o for o in self.objects.values() if o.allows(peer.uid, peer.gids, READ)]
        return Reply(json.dumps([self._describe(o) for o in readable]).encode())

    def _stat_page(self, peer: Peer, after: str) -> Reply:
        """The objects ``peer`` may read whose names sort after ``after`` (code points, as
        UTF-8 bytes sort), as many as one reply holds: the listing goes on like readdir,
        so an object made or unlinked meanwhile may or may not be in it."""
        names = sorted(
            name
            for name, obj in self.objects.items()
            if name > after and obj.allows(peer.uid, peer.gids, READ)
        )
        entries = (self._described_within(self.objects[n], _LIST_ROOM) for n in names)
        return Reply(_listed_within(entries, _LIST_ROOM))

    def _described_within(self, obj: SharedObject, room: int) -> str:
        """``obj``'s STAT entry as JSON of at most ``room`` bytes: if its list of clients is
        too long for that, as many as fit, and ``clients_omitted``: how many were left out."""
        info = self._describe(obj)
        text = json.dumps(info)
        if len(text) <= room:
            return text
        clients = info["clients"]

        def cut(k: int) -> str:
            return json.dumps({**info, "clients": clients[:k], "clients_omitted": len(clients) - k})

        fits, too_many = 0, len(clients)  # the most clients that fit: bisect
        while too_many - fits > 1:
            mid = (fits + too_many) // 2
            if len(cut(mid)) <= room:
                fits = mid
            else:
                too_many = mid
        return cut(fits)

    def _describe(self, obj: SharedObject) -> dict[str, Any]:
        """What STAT shows of an object: its figures and each client's mapped bytes."""
        info = obj.describe()
        info["clients"] = [
            {
                "pid": self.peers[cid].pid,
                "uid": self.peers[cid].uid,
                "mapped_bytes": obj.mapped_by(cid),
            }
            for cid in sorted(set(obj.handles) | set(obj.holders))
            if cid in self.peers
        ]
        return info

    def _verify(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        """The differences between the counts and the clients' maps: all of them, or with
        FLAG_AFTER those past a page, as many as one reply holds (recomputed each time)."""
        self._drain_rings()
        body, after = req.body, 0
        if req.flags & wire.FLAG_AFTER:
            if len(body) < wire.U64.size:
                raise wire.ProtocolError("VERIFY with AFTER begins with the page to list from")
            (after,) = wire.U64.unpack_from(body)
            body = body[wire.U64.size :]
        name = wire.name_of(body)
        obj = self.objects.get(name)
        if obj is None or not obj.allows(peer.uid, peer.gids, READ):
            raise no_such(name)
        kernel = MapCounts(obj.counts.npages)
        dev, ino = obj.identity()
        # Every client with the memfd: one that maps it without telling us has no counts.
        clients = [self.peers[i] for i in {*obj.holders, *obj.handles} if i in self.peers]
        procs = {c.pid: c.pidfd for c in clients}
        ration = None if peer.uid == 0 else self._verify_rations.setdefault(peer.uid, Ration())
        if ration is not None:
            ration.check(peer.uid)
        started = time.monotonic()

        def in_time() -> None:  # now and then while /proc files are read
            if ration is not None and time.monotonic() - started > VERIFY_MOST_S:
                raise OSError(
                    errno.EAGAIN,
                    f"verifying {name!r} took over {VERIFY_MOST_S:g} s of the daemon's time "
                    f"(the /proc files of {len(procs)} processes), the most one VERIFY of a "
                    "user other than root may take",
                )

        try:
            for pid, pidfd in procs.items():  # each process once
                add_maps_of(pid, dev, ino, obj.page_size, kernel, pidfd, in_time)
            shown = _pins_shown(obj, procs, in_time)
        finally:
            if ration is not None:
                ration.spend(time.monotonic() - started)
        for pin in obj.pins:  # forked children: counted, but not clients we can read
            if pin.lifeline not in shown:
                for first, last in pin.ranges:
                    kernel.add(first, last)
        diffs = (
            json.dumps(
                {
                    "first_page": max(a, after),
                    "stop_page": b,
                    "daemon_count": ours,
                    "kernel_count": theirs,
                }
            )
            for a, b, ours, theirs in obj.counts.diff(kernel)
            if b > after
        )
        if req.flags & wire.FLAG_AFTER:
            return Reply(_listed_within(diffs, _LIST_ROOM))
        return Reply(f"[{','.join(diffs)}]".encode())

    def _pin(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        handle, ranges = wire.unpack_ranges(req.body)
        obj = self._object(peer, handle)
        if len(fds) != 1:
            raise wire.ProtocolError(f"PIN carries one lifeline descriptor, not {len(fds)}")
        pages = obj.pages(ranges)
        lifeline = fds[0]
        check_lifeline(lifeline)
        os.set_blocking(lifeline, False)
        held = sum(pin.uid == peer.uid for o in self._all_objects() for pin in o.pins)
        if peer.uid != 0 and held >= MAX_PINS_PER_UID:
            raise OSError(
                errno.EDQUOT,
                f"uid {peer.uid} holds {held} pins, the most the daemon keeps for one user "
                f"(each holds a descriptor): {obj.name!r} is not pinned",
            )
        obj.pin(lifeline, pages, peer.uid, peer.pid)  # may refuse (ENOMEM): then nothing is watched
        try:
            self._watch(lifeline, lambda: self._lifeline_readable(obj, lifeline))
        except BaseException:
            obj.unpin(lifeline, close=False)  # the handler closes it
            raise
        return Reply(kept=[lifeline])

    def _lifeline_readable(self, obj: SharedObject, lifeline: int) -> None:
        """The pin holds until its pipe reads EOF: a forked child (and its descendants)
        is gone. Bytes written into the pipe are read and ignored."""
        try:
            if os.read(lifeline, 4096):
                return
        except BlockingIOError:
            return
        except OSError:
            pass  # cannot be read: treat it as gone
        self._unwatch(lifeline)
        obj.unpin(lifeline)
        self._forget_unused()

    def _sync(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        if req.body:
            raise wire.ProtocolError(f"SYNC has no body, not {len(req.body)} bytes")
        return Reply()

    def _ring(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        if req.body:
            raise wire.ProtocolError(f"RING has no body, not {len(req.body)} bytes")
        if not rings.SUPPORTED:
            raise OSError(errno.EOPNOTSUPP, "no request rings on this machine: use the socket")
        if peer.ring is not None:  # asked again (its caller was interrupted, say): a new one
            self._drop_ring(peer)  # (_receive served what the old one held)
        held = sum(1 for p in self._ring_peers.values() if p.uid == peer.uid)
        if peer.uid != 0 and held >= MAX_RINGS_PER_UID:
            raise OSError(
                errno.EDQUOT,
                f"uid {peer.uid} has {held} rings, the most the daemon gives one user "
                f"({MAX_RINGS_PER_UID}): this connection uses the socket",
            )
        fd = rings.create()
        try:
            peer.ring = rings.DaemonRing(fd)
        except BaseException:
            os.close(fd)
            raise
        self._ring_peers[peer.id] = peer
        self._poll_ring(peer)
        return Reply(fds=[fd])

    def _wake(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        if req.body:
            raise wire.ProtocolError(f"WAKE has no body, not {len(req.body)} bytes")
        return Reply()  # _receive served the ring first

    def _count(self, peer: Peer, req: wire.Request, fds: list[int]) -> Reply:
        self._drain_rings()
        handle, offset = wire.COUNT.unpack(req.body)
        obj = self._object(peer, handle)
        if not 0 <= offset < obj.size:
            raise ValueError(f"offset {offset:#x} is outside {obj.name!r} (size {obj.size:#x})")
        return Reply(wire.U64.pack(obj.counts.count(offset // obj.page_size)))

    # -- for metrics -----------------------------------------------------------------------

    @property
    def crowded(self) -> bool:
        """Whether the CPUs were crowded at the last look (see ``devanon.broker.crowding``)."""
        return self._crowd.last

    def snapshot(self) -> list[dict[str, object]]:
        """Every object's figures, as stat shows root (taken under ``state_lock``)."""
        with self.state_lock:
            return [{**obj.describe(), "clients": len(obj.holders)} for obj in self._all_objects()]


_REFUSALS_KEPT = 64
"""Refused MAPs a peer's give-backs are checked against: a give-back follows its MAP at
once (the client sends it as soon as it stops waiting)."""
_GIVE_BACK_RULE = "GIVE_BACK goes only on a one-range UNMAP with NOREPLY"

SO_PEERPIDFD = 77
"""getsockopt: a pidfd of the peer as it was at connect() (Linux 6.5)."""


def _pins_shown(
    obj: SharedObject, procs: dict[int, int], in_time: Callable[[], None] = lambda: None
) -> set[int]:
    """The lifelines of ``obj``'s pins whose forked child (or a descendant: one pin counts
    them all) is among ``procs`` (pid: pidfd), the clients whose maps VERIFY reads: it
    holds the pipe's write end. Their maps show the copy the pin counts: not twice. (The
    parent that made the pin holds the write end too until the fork is done: not it.)"""
    if not obj.pins:
        return set()
    pipes = {pin.lifeline: os.fstat(pin.lifeline).st_ino for pin in obj.pins}
    inodes = set(pipes.values())
    written = {}
    for pid, pidfd in procs.items():  # (a process may hold any number of descriptors)
        written[pid] = pipes_written_by(pid, inodes, pidfd)
        in_time()
    return {
        pin.lifeline
        for pin in obj.pins
        if any(pipes[pin.lifeline] in held for pid, held in written.items() if pid != pin.pid)
    }


def _group_id(group: str) -> int:
    """The gid of the socket's group; ValueError naming it if there is none."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"socket group {group!r}: no such group") from None


def _listed_within(parts: Iterable[str], room: int) -> bytes:
    """A JSON list of the first of ``parts`` (JSON texts, each within ``room``) that fit in
    ``room`` bytes with their commas: one page of a listing; the next begins where it ends."""
    kept: list[str] = []
    for part in parts:
        room -= len(part) + bool(kept)
        if room < 0:
            break
        kept.append(part)
    return f"[{','.join(kept)}]".encode()


def _with_requests(peers: Iterable[Peer]) -> list[Peer]:
    """Those of ``peers`` whose rings hold requests not yet taken."""
    return [p for p in peers if p.ring is not None and p.ring.pending()]


def _peer_pidfd(sock: socket.socket, pid: int) -> int:
    """A pidfd for the client. SO_PEERPIDFD names the very process that connected;
    pidfd_open(pid), the fallback on older kernels, could name another process that got
    a dead client's pid in the meantime."""
    try:
        (fd,) = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))
    except OSError:
        return os.pidfd_open(pid)
    os.set_inheritable(fd, False)
    return int(fd)


def _remove_stale_socket(path: str) -> None:
    """Make room for the daemon's socket at ``path``: a socket nobody listens on is a dead
    daemon's, and goes. A daemon that answers there is DaemonRunning; anything else (a
    file, a directory, a symlink, a socket that refuses us otherwise) is not ours to
    remove: FileExistsError naming the path."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST, f"{path} exists and is not a socket: not replacing it with the daemon's"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody listens
    except OSError as e:
        raise FileExistsError(
            errno.EEXIST,
            f"{path} is a socket the daemon cannot probe ({e.strerror}): not replacing it",
        ) from None
    else:
        raise DaemonRunning(errno.EADDRINUSE, f"a devanon daemon already serves {path}")
    finally:
        probe.close()


SWEEP_EVERY_S = 10.0
"""How often the daemon punches data that lies in pages nobody counts (``_sweep_uncounted``)."""
_EVERY_DESCRIPTOR = socket.CMSG_SPACE(253 * 4)
"""Room for every descriptor a message can carry (SCM_MAX_FD): those that found none the
kernel would close itself, in the daemon's thread, and such a close may wait."""
_CLOSE_BACKLOG = 256
"""Files waiting to be closed past which a client that sends descriptors is cut off: the
close of one of them blocks (a file system's flush waiting on its server), and the daemon
would otherwise hold every descriptor sent after it."""
_SWEEP_SLICE = 0.005
_SWEEP_GAP = 0.05
"""A sweep works ``_SWEEP_SLICE`` seconds at a time, ``_SWEEP_GAP`` apart (a tenth of the
loop's time at most while there is more to walk)."""
VERIFY_MOST_S = 0.5
"""The daemon's time one VERIFY (of a uid other than root) may take: it reads every
client's /proc/PID/maps, which their owners make as long as they like, and the daemon
serves no one meanwhile."""


@dataclass
class Ration:
    """The daemon's time a uid's VERIFYs may take: ``VERIFY_MOST_S`` at once, coming back
    at ``RATE`` (a twentieth of a CPU) once spent."""

    RATE = 0.05
    left: float = VERIFY_MOST_S
    at: float = field(default_factory=lambda: time.monotonic())

    def check(self, uid: int) -> None:
        """EAGAIN unless some time is left (after what came back since)."""
        now = time.monotonic()
        self.left = min(VERIFY_MOST_S, self.left + (now - self.at) * self.RATE)
        self.at = now
        if self.left <= 0:
            wait = -self.left / self.RATE
            raise OSError(
                errno.EAGAIN,
                f"uid {uid}'s VERIFYs took the daemon's time they may have for now "
                f"({self.RATE:.0%} of a CPU): try again in {wait:.1f} s",
            )

    def spend(self, seconds: float) -> None:
        self.left -= seconds


def _set_socket_rights(path: str, bound: tuple[int, int], mode: int, gid: int | None) -> None:
    """chown and chmod the socket the daemon bound at ``path``, never what the path leads
    to now: whoever may write its directory can rename a symlink over it, and a chmod by
    path (run as root) would follow it to any file. So the socket itself is opened
    (O_PATH, O_NOFOLLOW), checked to be the one bound, and changed through that."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != bound or not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST,
                f"{path} was replaced just after the daemon bound it (is its directory "
                "writable by others?): not changing what is there now",
            )
        itself = f"/proc/self/fd/{fd}"  # (fchmod and fchown refuse an O_PATH descriptor)
        if gid is not None:
            os.chown(itself, -1, gid)
        os.chmod(itself, mode)
    finally:
        os.close(fd)


def _raise_descriptor_limit() -> None:
    """Every object, client and pin holds descriptors: allow as many as the kernel lets a
    process have (``fs.nr_open``; it takes CAP_SYS_RESOURCE), else as the hard limit
    does, so that the per-user caps of many users fit (each uid may take ~7,000: 1,024
    objects, 1,024 connections of two, 4,096 pins)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(OSError, ValueError):  # (without CAP_SYS_RESOURCE: refused)
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            most = int(f.read())
        if most > hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
            return
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_BATCH = 16
"""Messages read from one client per wake-up (the others get their turn after)."""
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_FAST_SIZE = wire.MAP_ONE.size
_RING_PASSES = 8
"""While rings keep the loop busy, it looks at the sockets every this many passes."""
_CROWDED_SPIN = 100e-6
"""The most the loop polls after a request while the machine is crowded: requests that
come closer together (8 clients mapping and unmapping in a loop) keep it polling, as
when it is not crowded; sparser ones (clients that compute between maps) let it nap."""
_DOZE = 30e-6
"""How long a crowded polling loop waits for a message when a pass finds nothing
(``_give_way``)."""
_NAP = 0.001
"""One nap of a crowded loop between looks at the rings (epoll's resolution)."""
_NAPPING = 0.02
"""How long a crowded loop naps, while it polls rings, before it sleeps until a doorbell
(a ring unused for ``_RING_IDLE`` is no longer polled: then it sleeps at once)."""
_RING_IDLE = 0.01
"""Seconds without requests after which a ring is no longer polled (its client then rings
the doorbell: one message, instead of the loop's time for every ring of every client)."""
_WAKE_REPLY = wire.REPLY.pack(wire.Op.WAKE, wire.STATUS_OK, 0)
_LIST_ROOM = wire.MAX_MESSAGE - wire.REPLY.size - 2
"""Bytes of JSON entries one STAT or VERIFY reply holds (within the list's brackets)."""
_FAST_OPS = frozenset((wire.Op.MAP, wire.Op.UNMAP))


@dataclass(slots=True)
class Reply:
    body: bytes = b""
    fds: list[int] = field(default_factory=list)
    """Descriptors to send (closed after sending)."""
    kept: list[int] = field(default_factory=list)
    """Received descriptors the handler keeps (the others are closed)."""
