"""Request rings with a real daemon: the kernel's view stays the oracle, hostile rings cut
off only their own client, and the order of a client's requests survives two channels."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import random
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from broker_daemon import Served, daemon_descriptors, start_daemon, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import data_pages, interrupt_once, kernel_counts

from devanon.broker import Client, connect
from devanon.broker import protocol as wire
from devanon.broker import ring as rings
from devanon.broker.server import MAX_RINGS_PER_UID

PS = os.sysconf("SC_PAGE_SIZE")
FORK = multiprocessing.get_context("fork")

pytestmark = pytest.mark.skipif(not rings.SUPPORTED, reason="rings are x86-64 only")


def _raw_with_ring(path: str, name: str) -> tuple[socket.socket, int, rings.ClientRing]:
    """A raw connection that opened ``name`` (its handle) and took a ring."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.settimeout(5)
    sock.send(wire.request(wire.Op.OPEN, 1, wire.OPEN.pack(0, 0, 0) + name.encode()))
    data, fds, _, _ = socket.recv_fds(sock, wire.MAX_MESSAGE, 4)
    for fd in fds:
        os.close(fd)
    (handle,) = wire.HANDLE.unpack_from(data, wire.REPLY.size)
    sock.send(wire.request(wire.Op.RING, 2))
    data, fds, _, _ = socket.recv_fds(sock, wire.MAX_MESSAGE, 4)
    assert wire.REPLY.unpack_from(data) == (wire.Op.RING, wire.STATUS_OK, 2) and len(fds) == 1
    ring = rings.ClientRing(fds[0])
    os.close(fds[0])
    return sock, handle, ring


def _post(sock: socket.socket, ring: rings.ClientRing, *record: int) -> None:
    """Write a request into the ring and ring the doorbell (whether or not it sleeps)."""
    assert ring.post(*record)
    sock.send(wire.request(wire.Op.WAKE, 0))


def _error(sock: socket.socket) -> tuple[int, int, int, str]:
    """The next socket message, an error: op, seq, errno, text."""
    data = sock.recv(wire.MAX_MESSAGE)
    op, status, seq = wire.REPLY.unpack_from(data)
    assert status == wire.STATUS_ERROR, data
    (code,) = wire.ERROR.unpack_from(data, wire.REPLY.size)
    return op, seq, code, data[wire.REPLY.size + wire.ERROR.size :].decode()


def _ring_reply(ring: rings.ClientRing) -> tuple[int, int, int]:
    """The next reply in the ring (the daemon writes it after the socket's error)."""
    got: list[tuple[int, int, int]] = []

    def arrived() -> bool:
        reply = ring.reply()
        if reply is not None:
            got.append(reply)
        return bool(got)

    assert wait_for(arrived)
    return got[0]


def test_maps_go_through_the_ring_and_the_counts_match_the_kernel(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("ringed", 64 * PS, create=True)
        rng = random.Random(4)
        held = []
        for _ in range(300):
            if held and rng.random() < 0.5:
                held.pop(rng.randrange(len(held))).close()
            else:
                first = rng.randrange(64)
                m = obj.map(first * PS, rng.randint(1, 64 - first) * PS)
                m.view()[:1] = b"r"
                held.append(m)
        ring = client._ring
        assert ring is not None and ring.words[rings.REQ_TAIL] == 300  # every one went there
        obj.flush()
        kernel = kernel_counts(obj.fd, [os.getpid()])
        assert [obj.map_count(p * PS) for p in range(64)] == [kernel.get(p, 0) for p in range(64)]
        assert client.verify("ringed") == []
        assert data_pages(obj.fd, 64 * PS, PS) <= set(kernel)  # nothing unmapped holds data
        for m in held:
            m.close()
        assert obj.resident_bytes() == 0
        obj.close()


def test_a_daemon_that_always_sleeps_is_woken_and_wakes_its_clients(socket_dir: Path) -> None:
    """With --spin-us 0 the daemon sleeps after every request, so every MAP needs both
    doorbells (the client's WAKE, then the daemon's): none may be lost."""
    served = start_daemon(str(socket_dir / "dv.sock"), "--spin-us", "0")
    try:
        with Client(served.socket, spin=0) as client:
            obj = client.open("sleepy", 4 * PS, create=True)
            took = []
            for i in range(300):
                t0 = time.monotonic()
                m = obj.map((i % 4) * PS, PS)
                m.view()[:1] = b"s"
                m.close()
                took.append(time.monotonic() - t0)
                # A lost doorbell is not a hang: the daemon looks at the rings every second
                # anyway, and a waiting client every 50 ms. It shows as such a pause.
                assert took[-1] < 0.9, f"map {i}: {took[-1]:.2f} s: a WAKE was lost"
            assert sum(took) < 6, f"{sum(took):.1f} s: the daemon's WAKEs are lost"
            assert client._ring is not None and client._ring.words[rings.REQ_TAIL] == 600
            assert obj.resident_bytes() == 0 and client.verify("sleepy") == []
            obj.close()
    finally:
        assert served.stop() == 0


def test_ring_requests_are_checked_like_messages(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("checked", 8 * PS, create=True)
        keep = obj.map(0, 8 * PS)
        keep.view()[:] = b"k" * 8 * PS
        before = client.stat("checked")[0]
        sock, handle, ring = _raw_with_ring(daemon.socket, "checked")

        _post(sock, ring, 77, 0, 10, handle, 0, PS)  # an op a ring does not carry
        assert _error(sock)[:3] == (77, 10, errno.EPROTO)
        _post(sock, ring, wire.Op.MAP, 0, 11, 99, 0, PS)  # no such handle
        assert _error(sock)[:3] == (wire.Op.MAP, 11, errno.EINVAL)
        assert _ring_reply(ring) == (wire.Op.MAP, wire.STATUS_ERROR, 11)
        _post(sock, ring, wire.Op.MAP, 0, 12, handle, 1, PS)  # unaligned
        op, seq, code, text = _error(sock)
        assert (op, seq, code) == (wire.Op.MAP, 12, errno.EINVAL) and "0x1" in text
        assert _ring_reply(ring) == (wire.Op.MAP, wire.STATUS_ERROR, 12)
        _post(sock, ring, wire.Op.UNMAP, wire.FLAG_NOREPLY, 13, handle, 0, PS)  # not mapped
        assert _error(sock)[:3] == (wire.Op.UNMAP, 13, errno.EINVAL)

        assert client.stat("checked")[0]["mapped_bytes"] == before["mapped_bytes"]
        _post(sock, ring, wire.Op.MAP, 0, 14, handle, 0, PS)  # a good one, counted
        assert _ring_reply(ring) == (wire.Op.MAP, wire.STATUS_OK, 14)
        assert obj.map_count(0) == 2
        sock.close()  # gone: its count goes, nothing of ours is punched
        assert wait_for(lambda: obj.map_count(0) == 1)
        after = client.stat("checked")[0]
        for key in ("mapped_bytes", "resident_bytes", "freed_bytes", "punch_calls"):
            assert after[key] == before[key], key
        assert bytes(keep.view()) == b"k" * 8 * PS and client.verify("checked") == []
        ring.close()
        keep.close()
        obj.close()


@pytest.mark.parametrize("how", ["impossible_tail", "replies_unread"])
def test_a_broken_ring_cuts_off_only_its_own_client(daemon: Served, how: str) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("steady", 4 * PS, create=True)
        keep = obj.map(0, 4 * PS)
        keep.view()[:] = b"s" * 4 * PS
        sock, handle, ring = _raw_with_ring(daemon.socket, "steady")
        if how == "impossible_tail":
            ring.words[rings.REQ_TAIL] = rings.SLOTS + 5
            sock.send(wire.request(wire.Op.WAKE, 0))
        else:  # MAPs whose replies it never reads: the reply ring fills up
            with contextlib.suppress(ConnectionResetError):  # the last WAKE may come late
                for seq in range(1, rings.SLOTS + 2):
                    _post(sock, ring, wire.Op.MAP, 0, seq, handle, PS, PS)
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):  # our WAKEs were left unread
            while sock.recv(wire.MAX_MESSAGE):
                pass  # the daemon's WAKEs: it is cut off when the connection ends
        assert wait_for(lambda: obj.map_count(PS) == 1)  # its counts went with it
        assert bytes(keep.view()) == b"s" * 4 * PS
        assert obj.resident_bytes() == 4 * PS and client.verify("steady") == []
        again = obj.map(0, PS)  # and the daemon serves the others as before
        again.close()
        ring.close()
        sock.close()
        keep.close()
        obj.close()


def _ring_batch(sock: socket.socket, ring: rings.ClientRing, op: int, handle: int) -> list[int]:
    """Post a whole ring of one-page requests at once, while the daemon sleeps, ring the
    doorbell, and take every reply (their statuses)."""
    assert wait_for(lambda: ring.words[rings.ASLEEP] == 1)  # served in one pass, then
    for seq in range(rings.SLOTS):
        assert ring.post(op, 0, 1000 + seq, handle, PS, PS) != rings.FULL
    sock.send(wire.request(wire.Op.WAKE, 0))
    statuses: list[int] = []

    def taken() -> bool:
        while (reply := ring.reply()) is not None:
            statuses.append(reply[1])
        return len(statuses) == rings.SLOTS

    assert wait_for(taken, timeout=3), f"{len(statuses)} replies of {rings.SLOTS}: cut off?"
    return statuses


def test_a_sleeping_client_gets_one_wake_per_batch_and_keeps_its_counts(daemon: Served) -> None:
    """A client asleep on its socket (``waiting`` set) while batches of its ring requests
    are served gets a WAKE a batch, not one a reply: 512 of them would overfill its socket,
    and the daemon cut it off for that, dropping its counts and punching a page it maps."""
    with connect(daemon.socket) as client:
        obj = client.open("woken", 2 * PS, create=True)
        sock, handle, ring = _raw_with_ring(daemon.socket, "woken")
        sock.send(wire.MAP_ONE.pack(wire.Op.MAP, 0, 3, handle, 0, PS))  # page 0: its count only
        assert wire.REPLY.unpack(sock.recv(wire.MAX_MESSAGE)) == (wire.Op.MAP, 0, 3)
        os.pwrite(obj.fd, b"data", 0)
        ring.words[rings.WAITING] = 1  # asleep on the socket, as far as the daemon knows
        assert _ring_batch(sock, ring, wire.Op.MAP, handle) == [wire.STATUS_OK] * rings.SLOTS
        assert obj.map_count(PS) == rings.SLOTS
        assert _ring_batch(sock, ring, wire.Op.UNMAP, handle) == [wire.STATUS_OK] * rings.SLOTS
        wakes = []
        sock.settimeout(0.2)
        with contextlib.suppress(TimeoutError):
            while message := sock.recv(wire.MAX_MESSAGE):
                wakes.append(wire.REPLY.unpack(message))
        assert 1 <= len(wakes) <= 16  # a batch in one pass, or a few (not one a reply: 512)
        assert wakes == [(wire.Op.WAKE, wire.STATUS_OK, 0)] * len(wakes)
        sock.settimeout(5)
        sock.send(wire.request(wire.Op.SYNC, 4))  # still connected
        assert wire.REPLY.unpack(sock.recv(wire.MAX_MESSAGE)) == (wire.Op.SYNC, 0, 4)
        assert obj.map_count(0) == 1 and obj.map_count(PS) == 0
        assert os.pread(obj.fd, 4, 0) == b"data" and obj.resident_bytes() == PS
        ring.close()
        sock.close()
        assert wait_for(lambda: obj.map_count(0) == 0) and obj.resident_bytes() == 0
        obj.close()


def test_an_unmap_posted_on_the_socket_stays_before_later_ring_requests(
    daemon: Served, tmp_path: Path
) -> None:
    """An unmap of two ranges goes on the socket; a map of one of its pages right after
    must not overtake it through the ring (the page would never reach 0 and be punched),
    so it reads zeros."""
    image = tmp_path / "image"
    image.write_bytes(b"i" * PS)
    with connect(daemon.socket) as client:
        obj = client.open("ordered", 3 * PS, create=True)
        for round_ in range(50):
            m = obj.map(0, 3 * PS)
            m.view()[:] = bytes([65 + round_ % 26]) * 3 * PS
            obj.overlay(m.address + PS, image, 0, PS)  # the middle page: the file's
            m.close()  # two ranges (pages 0 and 2): one UNMAP message on the socket
            again = obj.map(0, PS)
            assert bytes(again.view()) == bytes(PS), f"round {round_}: page 0 kept its data"
            again.close()
        assert obj.resident_bytes() == 0 and client.verify("ordered") == []
        obj.close()


RECORDS = st.lists(
    st.tuples(
        st.one_of(st.sampled_from([wire.Op.MAP, wire.Op.UNMAP]), st.integers(0, 255)),
        st.sampled_from([0, wire.FLAG_NOREPLY, 0xFFFF]),
        st.integers(0, 2**32 - 1),
        st.sampled_from([1, 2, 0, 2**32 - 1]),
        st.one_of(st.integers(0, 9).map(lambda p: p * PS), st.integers(0, 2**64 - 1)),
        st.one_of(st.integers(1, 9).map(lambda p: p * PS), st.integers(0, 2**64 - 1)),
    ),
    max_size=2 * rings.SLOTS,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(records=RECORDS, tail_jump=st.one_of(st.none(), st.integers(-5, 2**64 - 1)))
def test_fuzzed_rings_leave_nothing_changed_once_their_client_is_gone(
    daemon: Served, records: list[tuple[int, ...]], tail_jump: int | None
) -> None:
    """Any records (and any index) a client writes into its ring: while it lives it may
    count what it was allowed to; once it is gone, every count, byte and descriptor of the
    daemon is as before, and the daemon serves on."""
    with connect(daemon.socket) as client:
        victim = client.open("victim", 8 * PS, create=True)
        keep = victim.map(0, 4 * PS)
        keep.view()[:] = b"v" * 4 * PS
        before = client.stat("victim")[0]
        fds_before = daemon_descriptors(daemon.process.pid)
        sock, handle, ring = _raw_with_ring(daemon.socket, "victim")
        assert handle == 1
        for record in records:
            if not ring.post(*record):
                sock.send(wire.request(wire.Op.WAKE, 0))  # full: let the daemon catch up
                assert wait_for(lambda r=record: bool(ring.post(*r)))  # type: ignore[misc]
            ring.reply()  # read a reply now and then (not all: the ring may fill)
        if tail_jump is not None:
            ring.words[rings.REQ_TAIL] = (ring.words[rings.REQ_TAIL] + tail_jump) % 2**64
        with contextlib.suppress(OSError):
            sock.send(wire.request(wire.Op.WAKE, 0))
            sock.send(wire.request(wire.Op.SYNC, 1))
        ring.close()
        sock.close()
        assert wait_for(lambda: client.stat("victim")[0]["clients"] == before["clients"])
        after = client.stat("victim")[0]
        for key in ("mapped_bytes", "resident_bytes", "count_runs"):
            assert after[key] == before[key], key
        assert [victim.map_count(p * PS) for p in range(8)] == [1] * 4 + [0] * 4
        assert bytes(keep.view()) == b"v" * 4 * PS and client.verify("victim") == []
        assert wait_for(lambda: daemon_descriptors(daemon.process.pid) == fds_before)
        assert daemon.process.poll() is None
        keep.close()
        victim.close()
        client.unlink("victim")


def test_an_idle_ring_is_no_longer_polled_and_its_doorbell_brings_it_back(
    daemon: Served,
) -> None:
    """While another client keeps the daemon awake, a ring unused for a while says the
    daemon sleeps (so the loop does not poll it), and its next request still gets served."""
    with connect(daemon.socket) as idle, connect(daemon.socket) as busy:
        obj = idle.open("idle", 4 * PS, create=True)
        other = busy.open("idle")
        obj.map(0, PS).close()
        other.map(PS, PS).close()
        ring = idle._ring
        assert ring is not None
        stop = threading.Event()

        def keep_busy() -> None:
            while not stop.is_set():
                other.map(PS, PS).close()

        thread = threading.Thread(target=keep_busy, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: ring.words[rings.ASLEEP] == 1)
            tail = ring.words[rings.REQ_TAIL]
            m = obj.map(2 * PS, PS)  # through the ring, with a WAKE
            assert ring.words[rings.REQ_TAIL] == tail + 1 and obj.map_count(2 * PS) == 1
            m.close()
        finally:
            stop.set()
            thread.join(10)
        assert idle.verify("idle") == []
        other.close()
        obj.close()


def _rings_until_refused(conn: Connection, path: str) -> None:
    """As nobody: connections that each ask for a ring, until one is refused; that one
    still maps, through the socket."""
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    clients, refused = [], None
    try:
        while refused is None and len(clients) <= 300:
            client = connect(path)
            clients.append(client)
            try:
                _, fds = client.call(wire.Op.RING)
            except OSError as e:
                refused = (e.errno, str(e))
            else:
                for fd in fds:
                    os.close(fd)
        last = Client(path)  # asks for its own ring at its first map, is refused, goes on
        obj = last.open("open-to-all", writable=False)
        m = obj.map(0, PS, writable=False)
        conn.send((len(clients) - 1, refused, last._ring is None, bytes(m.view()[:1])))
        m.close()
        obj.close()
        last.close()
    finally:
        for client in clients:
            client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_one_user_cannot_take_more_than_its_share_of_rings(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("open-to-all", PS, create=True, mode=0o644)
        m = obj.map(0, PS)
        m.view()[:1] = b"o"
        ours, theirs = FORK.Pipe()
        proc = FORK.Process(target=_rings_until_refused, args=(theirs, daemon.socket))
        proc.start()
        assert ours.poll(60), "the other uid's process said nothing"
        granted, refused, fell_back, data = ours.recv()
        proc.join(10)
        assert granted == MAX_RINGS_PER_UID and refused is not None
        assert refused[0] == errno.EDQUOT and str(MAX_RINGS_PER_UID) in refused[1]
        assert fell_back and data == b"o"
        assert wait_for(lambda: client.verify("open-to-all") == [])
        with connect(daemon.socket) as root:  # root is not held
            root.open("open-to-all").map(0, PS).close()
            assert root._ring is not None
        m.close()
        obj.close()


def _daemon_rings(daemon: Served) -> int:
    """How many rings the daemon maps (the kernel's view: its /proc/PID/maps)."""
    with open(f"/proc/{daemon.process.pid}/maps") as f:
        return sum(1 for line in f if "/memfd:devanon-ring" in line)


class _SignalAfterSend:
    """A client socket that raises SIGUSR1 right after sending a multi-range UNMAP (as a
    signal delivered during that send would be handled)."""

    def __init__(self, real: socket.socket) -> None:
        self.real, self.armed = real, False

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def send(self, message: bytes) -> int:
        n = self.real.send(message)
        if self.armed and message[0] == wire.Op.UNMAP and len(message) > wire.MAP_ONE.size:
            self.armed = False
            signal.raise_signal(signal.SIGUSR1)
        return n


def test_a_signal_handlers_ring_request_does_not_overtake_a_socket_one(
    daemon: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unmap of two ranges goes on the socket; a signal handler that runs just after its
    send maps one of those pages: the daemon must serve the unmap first (the page reads
    zeros), though the handler's map could go through the ring."""
    image = tmp_path / "image"
    image.write_bytes(b"i" * PS)
    with connect(daemon.socket) as client:
        obj = client.open("handler", 3 * PS, create=True)
        obj.map(0, PS).close()  # the ring is set up
        sock = _SignalAfterSend(client._sock)
        monkeypatch.setattr(client, "_sock", sock)
        seen: list[bytes] = []

        def handler(*_: object) -> None:
            again = obj.map(0, PS)
            seen.append(bytes(again.view()[:4]))
            again.close()

        old = signal.signal(signal.SIGUSR1, handler)
        try:
            m = obj.map(0, 3 * PS)
            m.view()[:] = b"A" * 3 * PS
            obj.overlay(m.address + PS, image, 0, PS)
            os.kill(daemon.process.pid, signal.SIGSTOP)  # both requests wait for it
            threading.Timer(0.3, os.kill, (daemon.process.pid, signal.SIGCONT)).start()
            sock.armed = True
            m.close()  # pages 0 and 2: one UNMAP message on the socket, then the handler
        finally:
            signal.signal(signal.SIGUSR1, old)
            os.kill(daemon.process.pid, signal.SIGCONT)
        assert seen == [bytes(4)], "the handler's map was served before the unmap sent first"
        obj.flush()
        assert client.verify("handler") == [] and obj.resident_bytes() == 0
        obj.close()


def test_a_map_interrupted_just_after_it_went_into_the_ring_is_given_back(
    daemon: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("given-back", 4 * PS, create=True)
        obj.map(0, PS).close()  # the ring is set up
        assert client._ring is not None
        # the MAP goes into the ring (the daemon will count it), then Ctrl-C
        interrupt_once(monkeypatch, client._ring, "post", after_call=True)
        with pytest.raises(KeyboardInterrupt):
            obj.map(PS, PS)
        obj.flush()
        assert kernel_counts(obj.fd, [os.getpid()]) == {}
        assert obj.map_count(PS) == 0 and client.verify("given-back") == []
        m = obj.map(PS, PS)
        m.view()[:1] = b"x"
        m.close()
        assert obj.resident_bytes() == 0  # nobody maps it: punched
        obj.close()


def test_a_client_interrupted_while_asking_for_its_ring_asks_again(
    daemon: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("asked", 4 * PS, create=True)
        interrupt_once(monkeypatch, client, "_await")
        with pytest.raises(KeyboardInterrupt):
            obj.map(0, PS)  # interrupted while the RING reply is awaited
        for _ in range(3):
            obj.map(0, PS).close()
        assert client._ring is not None and client._ring.words[rings.REQ_TAIL] == 6
        assert wait_for(lambda: _daemon_rings(daemon) == 1)  # the first one was dropped
        assert client.verify("asked") == [] and obj.resident_bytes() == 0
        obj.close()
