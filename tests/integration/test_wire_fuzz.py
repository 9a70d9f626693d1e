"""Fuzzing the daemon's wire input (hypothesis), with the kernel and the daemon as oracles.

One daemon serves every example. A well-behaved client keeps the object "victim" open, with
pages mapped (some twice) and written. Each example connects a raw fuzz connection that opens
the victim properly (handle 1) and an object of its own (handle 2), then sends generated
messages:

- near-valid requests of every op and of unknown ops: random flags, pad and seq; handles
  real and unknown; ranges at and around the objects' ends, zero, huge, unaligned, many;
  bodies of the right op or of another, cut short or lengthened; names with bad UTF-8, NUL,
  '/', over 255 bytes;
- 28-byte one-range MAP and UNMAP messages (``wire.MAP_ONE``: the daemon's fast path);
- oversized messages, short ones, garbage, and an empty one (which reads as a close);
- descriptors (SCM_RIGHTS) where none belong, and on PIN of the wrong kind or too many.

A SYNC barrier after each message collects its replies: exactly one (none for a NOREPLY
UNMAP that succeeds), well formed, naming the request, with a descriptor only on a successful
OPEN, never an internal error; what cannot be a request is refused with EPROTO. The daemon
may cut the connection off once it made more than MAX_ERRORS protocol errors (and must then);
the example reconnects and goes on.

After each example the fuzz connection is closed (every count it held goes), its pipes are
closed (every pin it made goes) and the objects it made are unlinked. Then the daemon must be
alive and serve the good client; the victim's counts must be exactly the good client's
(COUNT of each page, and VERIFY against /proc/PID/maps); its bytes must read back through the
good client's mappings and its resident bytes be as before; and the daemon must hold as many
descriptors as before.

The tests at the end pin down three daemon bugs found while writing this fuzzer, by reading
server.py and trying its edges (each needs an input a bounded random search would not find):
a PIN refused for room that took the daemon down, a message one byte over the limit that was
served, and a pin dropped when its lifeline was written to rather than at EOF.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from broker_daemon import Served, daemon_descriptors, start_daemon, wait_for
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devanon.broker import Client, SharedAnon, connect
from devanon.broker import protocol as wire
from devanon.broker.server import MAX_ERRORS, MAX_SIZE
from devanon.mapper import Mapping

PS = os.sysconf("SC_PAGE_SIZE")
VICTIM = "victim"
VICTIM_PAGES = 16
VICTIM_SIZE = VICTIM_PAGES * PS
OWN = "fuzz-own"
OWN_SIZE = 8 * PS
GOOD_MAPS = ((0, 4), (8, 4), (10, 2))
"""(first page, pages) the good client maps and writes: pages 10 and 11 are mapped twice."""
ROUND_TRIP_PAGE = 13
"""A victim page nobody maps: the good client maps, writes and unmaps it after each example."""
REPLY_TIMEOUT = 5.0
"""Seconds any socket operation may take before the test fails (nothing can hang)."""
SETTLE = 1.0
"""Seconds the daemon gets to notice a closed connection or pipe and drop what it held."""
FD_ROOM = (wire.ANCILLARY - socket.CMSG_LEN(0)) // 4
"""Descriptors the daemon's ancillary buffer has room for; more are refused."""
MAX_RANGES = (wire.MAX_MESSAGE - wire.HEADER.size - wire.HANDLE.size) // wire.RANGE.size
"""The most ranges one MAP, UNMAP or PIN message can carry."""
PADDED_HEADER = struct.Struct("<BBHI")
"""A request header whose pad byte we choose (``wire.HEADER`` always packs 0)."""
PADDED_MAP_ONE = struct.Struct("<BBHIIQQ")
"""``wire.MAP_ONE`` with the pad byte ours to choose."""
KNOWN_OPS = frozenset(int(op) for op in wire.Op)
BARRIER_SEQ = 0xB0_0000_00
"""The seq of the SYNC sent after each probe (the next one if the probe has this seq)."""


def expected_counts() -> list[int]:
    """The victim's count of each page when only the good client maps it."""
    counts = [0] * VICTIM_PAGES
    for first, pages in GOOD_MAPS:
        for page in range(first, first + pages):
            counts[page] += 1
    return counts


def page_pattern(page: int) -> bytes:
    """The bytes the good client writes into a victim page (never all zeros)."""
    stamp = f"victim page {page}|".encode()
    return (stamp * (PS // len(stamp) + 1))[:PS]


# -- what the fuzz connection sends -------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One message for the fuzz connection to send, and the descriptors it carries."""

    payload: bytes
    fds: str = "none"
    """What to attach as SCM_RIGHTS: a kind that ``LocalFds.attach`` knows."""
    keep_pipe_open: bool = True
    """Keep our other end of an attached pipe till the example ends (a PIN holds till then);
    otherwise close it at once (the pin goes while the fuzzing goes on)."""

    def __repr__(self) -> str:
        shown = self.payload[:64]
        more = f" +{len(self.payload) - len(shown)} bytes" if len(self.payload) > 64 else ""
        return f"Probe({shown!r}{more}, fds={self.fds!r}, keep_pipe_open={self.keep_pipe_open})"


U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
OPS = st.one_of(st.sampled_from(sorted(KNOWN_OPS)), st.integers(0, 255))
PADS = st.one_of(st.just(0), st.integers(1, 255))
FLAGS = st.one_of(st.sampled_from([0, wire.FLAG_NOREPLY]), U16)
HANDLES = st.one_of(st.sampled_from([1, 2]), st.sampled_from([3, 0, 2**31, 2**32 - 1]), U32)
"""1 is the victim, 2 the connection's own object, 3 the next one a fuzzed OPEN makes."""
BYTE_SPOTS = sorted(
    {
        0,
        1,
        PS - 1,
        PS,
        PS + 1,
        OWN_SIZE - PS,
        OWN_SIZE,
        OWN_SIZE + PS,
        VICTIM_SIZE - PS,
        VICTIM_SIZE - 1,
        VICTIM_SIZE,
        VICTIM_SIZE + 1,
        VICTIM_SIZE + PS,
        MAX_SIZE,
        2**63,
        2**64 - PS,
        2**64 - 1,
    }
)
"""Offsets and lengths at and around the objects' ends and the integers' ends."""
PAGE_OFFSETS = st.integers(0, VICTIM_PAGES).map(lambda page: page * PS)
PAGE_LENGTHS = st.integers(1, VICTIM_PAGES).map(lambda pages: pages * PS)
OFFSETS = st.one_of(PAGE_OFFSETS, PAGE_OFFSETS, st.sampled_from(BYTE_SPOTS), U64)
LENGTHS = st.one_of(PAGE_LENGTHS, PAGE_LENGTHS, st.sampled_from(BYTE_SPOTS), U64)
RANGES = st.tuples(OFFSETS, LENGTHS)
INSIDE = st.integers(0, VICTIM_PAGES - 1).flatmap(
    lambda first: st.tuples(
        st.just(first * PS), st.integers(1, VICTIM_PAGES - first).map(lambda pages: pages * PS)
    )
)
"""A range inside the victim (and, half the time, inside the connection's own object)."""
SIZES = st.one_of(
    st.sampled_from([0, PS, OWN_SIZE, VICTIM_SIZE, 1, PS + 1, MAX_SIZE, MAX_SIZE + PS, 2**64 - PS]),
    U64,
)
MODES = st.one_of(st.sampled_from([0o600, 0o644, 0o777, 0, 0o1000, 0o7777]), U32)
OPEN_FLAGS = st.one_of(
    st.sampled_from(
        [0, wire.OPEN_CREATE, wire.OPEN_WRITABLE, wire.OPEN_CREATE | wire.OPEN_WRITABLE]
    ),
    st.integers(0, 255),
)
NAMES = st.one_of(
    st.sampled_from(
        [VICTIM.encode(), OWN.encode(), b"fuzz-a", b"fuzz-b", b"x" * wire.MAX_NAME, "π-名".encode()]
    ),
    st.sampled_from(
        [
            b"",
            b"a/b",
            b"/",
            b"a\0b",
            b"\0",
            b"\xff",
            b"\xc3",  # a UTF-8 sequence cut short
            b"\xed\xa0\x80",  # a surrogate: not UTF-8
            b"x" * (wire.MAX_NAME + 1),
            b"y" * 1000,
        ]
    ),
    st.text(min_size=1, max_size=12).map(str.encode),
    st.binary(max_size=300),
)


@st.composite
def range_bodies(draw: st.DrawFn) -> bytes:
    """A MAP/UNMAP/PIN body: a handle and 0.. ranges, sometimes repeated up to the limit."""
    handle = draw(HANDLES)
    ranges = draw(st.lists(RANGES, max_size=4))
    times = draw(st.sampled_from([1, 2, 100, MAX_RANGES]))
    return wire.pack_ranges(handle, (ranges * times)[:MAX_RANGES])


OPEN_BODIES = st.builds(
    lambda size, mode, flags, name: wire.OPEN.pack(size, mode, flags) + name,
    SIZES,
    MODES,
    OPEN_FLAGS,
    NAMES,
)
BODY_OF: dict[int, st.SearchStrategy[bytes]] = {
    wire.Op.OPEN: OPEN_BODIES,
    wire.Op.MAP: range_bodies(),
    wire.Op.UNMAP: range_bodies(),
    wire.Op.CLOSE: st.builds(wire.HANDLE.pack, HANDLES),
    wire.Op.UNLINK: NAMES,
    wire.Op.STAT: st.one_of(st.just(b""), NAMES),
    wire.Op.VERIFY: NAMES,
    wire.Op.PIN: range_bodies(),
    wire.Op.COUNT: st.builds(wire.COUNT.pack, HANDLES, OFFSETS),
    wire.Op.SYNC: st.just(b""),
    wire.Op.RING: st.just(b""),
    wire.Op.WAKE: st.just(b""),
}
ANY_BODY = st.one_of(*BODY_OF.values(), st.binary(max_size=64))
FD_KIND_NAMES = [
    "none",
    "pipe_read",
    "pipe_write",
    "two_pipes",
    "too_many",
    "devnull",
    "socket",
    "memfd",
]
"""What a message may carry: see ``LocalFds.attach``."""
FD_KINDS = st.sampled_from(FD_KIND_NAMES)
PIN_FD_KINDS = st.sampled_from(["pipe_read", *FD_KIND_NAMES])  # PINs: more real lifelines


@st.composite
def structured(draw: st.DrawFn) -> Probe:
    """A header (any op, pad, flags, seq) and a near-valid body, maybe cut short or extended."""
    op = draw(OPS)
    mismatched = draw(st.integers(0, 3)) == 3
    body = draw(ANY_BODY if mismatched or op not in BODY_OF else BODY_OF[op])
    edit = draw(st.sampled_from(["none", "none", "cut", "extend"]))
    if edit == "cut" and body:
        body = body[: -draw(st.integers(1, len(body)))]
    elif edit == "extend":
        body += draw(st.binary(min_size=1, max_size=16))
    header = PADDED_HEADER.pack(op, draw(PADS), draw(FLAGS), draw(U32))
    fds = draw(PIN_FD_KINDS if op == wire.Op.PIN else st.one_of(st.just("none"), FD_KINDS))
    return Probe((header + body)[: wire.MAX_MESSAGE], fds, draw(st.booleans()))


@st.composite
def map_ones(draw: st.DrawFn) -> Probe:
    """A 28-byte one-range MAP or UNMAP (or another op of that size) with random fields."""
    op = draw(st.one_of(st.sampled_from([wire.Op.MAP, wire.Op.UNMAP]), st.integers(0, 255)))
    payload = PADDED_MAP_ONE.pack(
        op, draw(PADS), draw(FLAGS), draw(U32), draw(HANDLES), draw(OFFSETS), draw(LENGTHS)
    )
    return Probe(payload, draw(st.one_of(st.just("none"), FD_KINDS)), draw(st.booleans()))


@st.composite
def oversized(draw: st.DrawFn) -> Probe:
    """A message past ``MAX_MESSAGE``, headed like a request."""
    size = draw(st.sampled_from([wire.MAX_MESSAGE + 1, wire.MAX_MESSAGE + 2, 100_000, 150_000]))
    header = PADDED_HEADER.pack(draw(OPS), 0, draw(FLAGS), draw(U32))
    fill = draw(st.sampled_from([b"\0", b"\xff", b"x"]))
    fds = draw(st.sampled_from(["none", "pipe_read", "devnull"]))
    return Probe(header + fill * (size - len(header)), fds)


ODDITIES = st.builds(
    Probe,
    st.one_of(
        st.sampled_from([b"", b"\0", bytes([wire.Op.MAP]), bytes([wire.Op.SYNC]) + bytes(6)]),
        st.binary(min_size=1, max_size=64),
    ),
    st.one_of(st.just("none"), FD_KINDS),
)
"""Short messages, garbage, and the empty message (a close, to the daemon)."""


@st.composite
def map_then_unmap(draw: st.DrawFn) -> list[Probe]:
    """A valid-looking MAP and an UNMAP of the same ranges, maybe in another order, one
    message each (the fast path when it is one range): counts of the fuzz connection's own."""
    handle = draw(st.sampled_from([1, 1, 2, 3]))
    ranges = draw(st.lists(INSIDE, min_size=1, max_size=3))
    unmapped = draw(st.permutations(ranges))
    flags = draw(st.sampled_from([0, wire.FLAG_NOREPLY]))
    seq = draw(U32)
    if len(ranges) == 1 and draw(st.booleans()):
        (offset, length) = ranges[0]
        pack = wire.MAP_ONE.pack
        return [
            Probe(pack(wire.Op.MAP, 0, seq, handle, offset, length)),
            Probe(pack(wire.Op.UNMAP, flags, (seq + 1) & 0xFFFF_FFFF, handle, offset, length)),
        ]
    return [
        Probe(wire.request(wire.Op.MAP, seq, wire.pack_ranges(handle, ranges))),
        Probe(wire.request(wire.Op.UNMAP, 0, wire.pack_ranges(handle, unmapped), flags)),
    ]


@st.composite
def steals(draw: st.DrawFn) -> list[Probe]:
    """UNMAPs of victim pages only the good client maps, once or twice, maybe after mapping
    a part of them (fast path or not): the daemon must refuse all but what was mapped."""
    first, pages = draw(st.sampled_from(GOOD_MAPS))
    start = draw(st.integers(first, first + pages - 1))
    stop = draw(st.integers(start + 1, first + pages))
    seq = draw(U32)
    probes = []
    if draw(st.booleans()):  # map a part: unmapping more than it, or it twice, is refused
        mapped = draw(st.integers(start, stop - 1))
        end = draw(st.integers(mapped + 1, stop))
        probes.append(
            Probe(wire.MAP_ONE.pack(wire.Op.MAP, 0, seq, 1, mapped * PS, (end - mapped) * PS))
        )
    flags = draw(st.sampled_from([0, wire.FLAG_NOREPLY]))
    offset, length = start * PS, (stop - start) * PS
    if draw(st.booleans()):
        unmap = wire.MAP_ONE.pack(wire.Op.UNMAP, flags, seq, 1, offset, length)
    else:
        unmap = wire.request(wire.Op.UNMAP, seq, wire.pack_ranges(1, [(offset, length)]), flags)
    return probes + [Probe(unmap)] * draw(st.integers(1, 2))


@st.composite
def pins(draw: st.DrawFn) -> Probe:
    """A PIN of ranges inside the object, with a real lifeline or a wrong descriptor."""
    handle = draw(st.sampled_from([1, 1, 2, 3]))
    ranges = draw(st.lists(INSIDE, min_size=1, max_size=3))
    body = wire.pack_ranges(handle, ranges)
    return Probe(
        wire.request(wire.Op.PIN, draw(U32), body), draw(PIN_FD_KINDS), draw(st.booleans())
    )


PROBES = st.one_of(  # one_of picks a branch evenly: structured() is three times as likely
    structured(), structured(), structured(), map_ones(), pins(), oversized(), ODDITIES
)
SCRIPTS = st.lists(
    st.one_of(PROBES.map(lambda probe: [probe]), map_then_unmap(), steals()),
    min_size=3,
    max_size=20,
).map(lambda groups: [probe for group in groups for probe in group])


def unlinks_the_victim(payload: bytes) -> bool:
    """True for an UNLINK of the victim: allowed (we are root), but it would end the run."""
    return (
        len(payload) >= wire.HEADER.size
        and payload[0] == wire.Op.UNLINK
        and payload[wire.HEADER.size :] == VICTIM.encode()
    )


# -- descriptors the fuzz connection sends --------------------------------------------------


@dataclass
class LocalFds:
    """Descriptors the test holds for one example: pipe ends that keep pins alive."""

    held: list[int] = field(default_factory=list)

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.held += [r, w]
        return r, w

    def attach(self, kind: str) -> tuple[list[int], list[int]]:
        """Descriptors of ``kind`` to send, and the other ends of their pipes."""
        if kind == "none":
            return [], []
        if kind == "pipe_read":
            r, w = self._pipe()
            return [r], [w]
        if kind == "pipe_write":
            r, w = self._pipe()
            return [w], [r]
        if kind == "two_pipes":
            (r1, w1), (r2, w2) = self._pipe(), self._pipe()
            return [r1, r2], [w1, w2]
        if kind == "too_many":
            r, w = self._pipe()
            return [r] * (FD_ROOM + 2), [w]
        if kind == "devnull":
            fd = os.open(os.devnull, os.O_RDWR)
        elif kind == "socket":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fd = a.detach()
            b.close()
        elif kind == "memfd":
            fd = os.memfd_create("fuzz-fd")
        else:
            raise ValueError(f"no descriptor kind {kind!r}")
        self.held.append(fd)
        return [fd], []

    def release(self, fds: list[int]) -> None:
        """Close these now (the daemon has its own copies of what it was sent)."""
        for fd in set(fds):
            if fd in self.held:
                self.held.remove(fd)
                os.close(fd)

    def close_all(self) -> None:
        self.release(list(self.held))


# -- the fuzz connection --------------------------------------------------------------------


def raw_connection(path: str) -> socket.socket:
    """A plain SEQPACKET connection to the daemon, every operation under a timeout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(REPLY_TIMEOUT)
    sock.connect(path)
    return sock


def receive(sock: socket.socket) -> tuple[bytes, int] | None:
    """One reply and how many descriptors came with it (closed at once); None at a close.

    A peer that closes with our messages unread leaves ECONNRESET pending, and the kernel
    reports it before the replies still queued: so after it, read on until the end."""
    for _ in range(2):
        try:
            data, fds, _, _ = socket.recv_fds(sock, wire.MAX_MESSAGE, 8)
        except ConnectionResetError:
            continue  # reported once; what the daemon sent before its close comes next
        except TimeoutError:
            raise AssertionError(f"no reply from the daemon within {REPLY_TIMEOUT} s") from None
        for fd in fds:
            os.close(fd)
        if not data and not fds:
            return None
        return data, len(fds)
    return None


def open_on(sock: socket.socket, name: str, size: int = 0, flags: int = 0) -> int | None:
    """OPEN ``name`` properly on a raw connection; its handle, or None if refused."""
    sock.send(wire.request(wire.Op.OPEN, 1, wire.OPEN.pack(size, 0o600, flags) + name.encode()))
    got = receive(sock)
    assert got is not None, f"the daemon closed the connection on a valid OPEN of {name!r}"
    data, _ = got
    if wire.REPLY.unpack_from(data)[1] != wire.STATUS_OK:
        return None
    return int(wire.OPENED.unpack_from(data, wire.REPLY.size)[0])


@dataclass(frozen=True)
class Sent:
    """What the daemon can read of a message: the facts its reply must agree with."""

    op: int
    seq: int
    readable: bool
    """A whole header of a known op, within the size and descriptor limits."""
    refused: bool
    """Cannot be a request at all: the reply must be an EPROTO error."""
    noreply: bool
    """An UNMAP with NOREPLY, or a WAKE: answered only if it fails."""

    @classmethod
    def of(cls, payload: bytes, nfds: int) -> Sent:
        whole = len(payload) >= wire.HEADER.size
        op = payload[0] if payload else 0
        seq = wire.HEADER.unpack_from(payload)[2] if whole else 0
        flags = wire.HEADER.unpack_from(payload)[1] if whole else 0
        within = len(payload) <= wire.MAX_MESSAGE and nfds <= FD_ROOM
        readable = whole and op in KNOWN_OPS and within
        noreply = readable and (
            op == wire.Op.WAKE or (op == wire.Op.UNMAP and bool(flags & wire.FLAG_NOREPLY))
        )
        return cls(op, seq, readable, not readable, noreply)


def check_reply(sent: Sent, data: bytes, nfds: int) -> int | None:
    """Assert that a reply is well formed and fits the request; its errno if an error."""
    assert len(data) >= wire.REPLY.size, f"a reply of {len(data)} bytes: {data!r}"
    op, status, seq = wire.REPLY.unpack_from(data)
    assert data[2:4] == b"\0\0", f"reply pad {data[2:4]!r}"
    if sent.readable:
        assert (op, seq) == (sent.op, sent.seq), f"reply names ({op}, {seq}), not {sent}"
    else:
        assert op in (sent.op, 0) and seq in (sent.seq, 0), f"reply names ({op}, {seq}): {sent}"
    body = data[wire.REPLY.size :]
    if status == wire.STATUS_ERROR:
        assert len(body) >= wire.ERROR.size and nfds == 0, f"error reply {data!r}, {nfds} fds"
        (code,) = wire.ERROR.unpack_from(body)
        text = body[wire.ERROR.size :].decode("utf-8")
        assert code > 0 and "internal error" not in text, f"errno {code}: {text}"
        assert not sent.refused or code == errno.EPROTO, f"{sent} refused with {code}: {text}"
        return int(code)
    assert status == wire.STATUS_OK, f"reply status {status}"
    assert not sent.refused, f"{sent} should have been refused, got {data[:64]!r}"
    with_fd = (wire.Op.OPEN, wire.Op.RING)
    assert nfds == (1 if op in with_fd else 0), f"{nfds} descriptors with {data[:64]!r}"
    if op == wire.Op.OPEN:
        assert len(body) == wire.OPENED.size
    elif op in (wire.Op.STAT, wire.Op.VERIFY):
        assert isinstance(json.loads(body), list)
    elif op == wire.Op.COUNT:
        assert len(body) == wire.U64.size
    else:
        assert body == b"", f"op {op} answered {body[:64]!r}"
    return None


class FuzzConnection:
    """A raw connection that opened the victim (handle 1) and an object of its own
    (handle 2), and counts the protocol errors the daemon answered it."""

    def __init__(self, path: str) -> None:
        self.sock = raw_connection(path)
        self.closed = False
        self.protocol_errors = 0
        assert open_on(self.sock, VICTIM) == 1
        own = wire.OPEN_CREATE | wire.OPEN_WRITABLE
        if open_on(self.sock, OWN, OWN_SIZE, own) is None:  # a fuzzed OPEN remade it
            open_on(self.sock, OWN)

    def close(self) -> None:
        self.sock.close()
        self.closed = True

    def send(self, payload: bytes, fds: list[int]) -> bool:
        """Send one message; False if the daemon had closed the connection."""
        try:
            if fds:
                socket.send_fds(self.sock, [payload], fds)
            else:
                self.sock.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            return False
        except TimeoutError:
            raise AssertionError(f"the daemon took no message for {REPLY_TIMEOUT} s") from None
        return True

    def exchange(self, probe: Probe, local: LocalFds) -> None:
        """Send ``probe`` and a SYNC barrier; check every reply that comes before it."""
        fds, other_ends = local.attach(probe.fds)
        sent = Sent.of(probe.payload, len(fds))
        delivered = self.send(probe.payload, fds)
        local.release(fds)
        if not probe.keep_pipe_open:
            local.release(other_ends)
        barrier = BARRIER_SEQ + 1 if sent.seq == BARRIER_SEQ else BARRIER_SEQ
        barrier_sent = delivered and self.send(wire.request(wire.Op.SYNC, barrier), [])
        replies: list[tuple[bytes, int]] = []
        while True:
            got = receive(self.sock) if delivered else None
            if got is None:
                self.close()
                break
            if barrier_sent and got[0] == wire.ok(wire.Op.SYNC, barrier):
                break
            replies.append(got)
        assert len(replies) <= 1, f"{len(replies)} replies to {probe!r}: {replies}"
        if not replies:
            assert self.closed or sent.noreply, f"no reply to {probe!r}"
        for data, nfds in replies:
            code = check_reply(sent, data, nfds)
            name = wire.Op(sent.op).name if sent.readable else "unreadable"
            event(f"{name}: {'ok' if code is None else errno.errorcode.get(code, code)}")
            assert not (sent.noreply and code is None), f"a NOREPLY request answered: {probe!r}"
            self.protocol_errors += code == errno.EPROTO
        if self.closed:
            event("cut off" if probe.payload else "closed by an empty message")
            assert self.protocol_errors > MAX_ERRORS or probe.payload == b"", (
                f"cut off after {self.protocol_errors} protocol errors, at {probe!r}"
            )
        else:
            assert self.protocol_errors <= MAX_ERRORS, (
                f"still served after {self.protocol_errors} protocol errors"
            )


# -- the good client and the daemon as oracles ----------------------------------------------


@dataclass
class Session:
    """The daemon and the well-behaved client, for every example."""

    served: Served
    client: Client = field(repr=False)
    log_tail: list[str] = field(default_factory=list, repr=False)

    @property
    def pid(self) -> int:
        return self.served.process.pid

    def drain_log(self) -> None:
        """Keep the tail of what the daemon logged (it would block once its stdout pipe
        is full)."""
        self.log_tail = [*self.log_tail, *self.served.read_log().splitlines()][-20:]

    def assert_alive(self) -> None:
        self.drain_log()
        code = self.served.process.poll()
        assert code is None, f"the daemon exited ({code}): {self.log_tail}"


@pytest.fixture
def session(daemon: Served) -> Iterator[Session]:
    with connect(daemon.socket) as client:
        yield Session(daemon, client)


@dataclass
class Victim:
    """The victim object and the good client's mappings of it (GOOD_MAPS, written)."""

    shared: SharedAnon
    mappings: list[Mapping]
    resident: int


@contextlib.contextmanager
def fresh_victim(client: Client) -> Iterator[Victim]:
    """A new victim for one example (examples must not share a state a bug could break),
    closed and unlinked afterwards."""
    shared = client.open(VICTIM, VICTIM_SIZE, create=True)
    mappings: list[Mapping] = []
    try:
        for first, pages in GOOD_MAPS:
            mapping = shared.map(first * PS, pages * PS)
            mappings.append(mapping)
            mapping.view()[:] = b"".join(page_pattern(p) for p in range(first, first + pages))
        yield Victim(shared, mappings, shared.resident_bytes())
    finally:
        with contextlib.suppress(OSError):  # a dead daemon fails the example already
            for mapping in mappings:
                mapping.close()
            shared.close()
            client.unlink(VICTIM)


def victim_counts(victim: Victim) -> list[int]:
    return [victim.shared.map_count(page * PS) for page in range(VICTIM_PAGES)]


def unlink_all_but_the_victim(client: Client) -> None:
    """Unlink every object a fuzzed OPEN made (each holds a descriptor of the daemon's)."""
    for info in client.stat():
        if info["name"] != VICTIM:
            client.unlink(info["name"])


def assert_victim_intact_and_nothing_leaked(
    session: Session, victim: Victim, fds_before: dict[int, str]
) -> None:
    """The oracles, once the fuzz connection and its pipes are closed."""
    session.assert_alive()
    settled = wait_for(lambda: victim_counts(victim) == expected_counts(), SETTLE)
    assert settled, f"victim counts {victim_counts(victim)}, not {expected_counts()}"
    assert session.client.verify(VICTIM) == []
    for (first, pages), mapping in zip(GOOD_MAPS, victim.mappings, strict=True):
        written = b"".join(page_pattern(p) for p in range(first, first + pages))
        assert bytes(mapping.view()) == written, f"pages {first}..{first + pages} changed"
    assert victim.shared.resident_bytes() == victim.resident
    assert session.client.stat(VICTIM)[0]["resident_bytes"] == victim.resident
    extra = victim.shared.map(ROUND_TRIP_PAGE * PS, PS)  # the daemon still does its job
    extra.view()[:5] = b"probe"
    assert victim.shared.map_count(ROUND_TRIP_PAGE * PS) == 1
    extra.close()
    assert victim.shared.map_count(ROUND_TRIP_PAGE * PS) == 0
    assert victim.shared.resident_bytes() == victim.resident  # the written page was punched
    unchanged = wait_for(lambda: len(daemon_descriptors(session.pid)) == len(fds_before), SETTLE)
    after = daemon_descriptors(session.pid)
    assert unchanged, (
        f"daemon descriptors: gained {sorted(set(after.items()) - set(fds_before.items()))}, "
        f"lost {sorted(set(fds_before.items()) - set(after.items()))}"
    )


def fuzz(session: Session, script: list[Probe], local: LocalFds) -> None:
    """Send the script on fuzz connections (a new one after each cut-off); close the last."""
    connection = FuzzConnection(session.served.socket)
    try:
        for probe in script:
            if unlinks_the_victim(probe.payload):
                continue
            if connection.closed:
                connection = FuzzConnection(session.served.socket)
            connection.exchange(probe, local)
    finally:
        connection.close()  # the daemon drops every count the connection held


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one daemon and good client for every example
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(script=SCRIPTS)
def test_fuzzed_wire_input_changes_no_count_and_leaks_nothing(
    session: Session, script: list[Probe]
) -> None:
    """Whatever a connection sends, others' counts and bytes stay, and nothing leaks."""
    session.assert_alive()
    for info in session.client.stat():  # what a failed example may have left
        session.client.unlink(info["name"])
    with fresh_victim(session.client) as victim:
        fds_before = daemon_descriptors(session.pid)
        local = LocalFds()
        try:
            fuzz(session, script, local)
        finally:
            local.close_all()  # every pin the fuzzing made goes
        session.assert_alive()
        unlink_all_but_the_victim(session.client)
        assert_victim_intact_and_nothing_leaked(session, victim, fds_before)


# -- daemon bugs found on the way (regression tests) ----------------------------------------


def refusal(sock: socket.socket) -> tuple[int, int, int]:
    """``(op, seq, errno)`` of the next reply, which must be an error."""
    got = receive(sock)
    assert got is not None, "the daemon closed the connection"
    data, _ = got
    op, status, seq = wire.REPLY.unpack_from(data)
    assert status == wire.STATUS_ERROR, f"accepted: {data[:64]!r}"
    return op, seq, wire.ERROR.unpack_from(data, wire.REPLY.size)[0]


def test_a_message_one_byte_over_the_limit_is_refused(daemon: Served) -> None:
    sock = raw_connection(daemon.socket)
    try:
        sock.send(wire.request(wire.Op.SYNC, 7, bytes(wire.MAX_MESSAGE + 1 - wire.HEADER.size)))
        assert refusal(sock)[2] == errno.EPROTO
    finally:
        sock.close()


def test_a_pin_refused_for_room_leaves_the_daemon_serving(socket_dir: Path) -> None:
    """One lifeline for several pins (a client pins what one child inherits, a pin a
    message); the pin past the daemon's room is refused, then the child goes."""
    served = start_daemon(str(socket_dir / "dv.sock"))
    local = LocalFds()
    try:
        with connect(served.socket) as client:
            shared = client.open("pins", PS, create=True)
            mapping = shared.map(0, PS)
            mapping.view()[:4] = b"kept"
            fds_before = len(daemon_descriptors(served.process.pid))
            sock = raw_connection(served.socket)
            handle = open_on(sock, "pins")
            assert handle is not None
            pin = wire.pack_ranges(handle, [(0, PS)] * MAX_RANGES)
            (lifeline,), (child_end,) = local.attach("pipe_read")
            pins = 0
            for seq in range(1, 100):  # 64 pins of MAX_RANGES fit, the 65th does not
                socket.send_fds(sock, [wire.request(wire.Op.PIN, seq, pin)], [lifeline])
                got = receive(sock)
                assert got is not None, "the daemon closed the connection"
                if wire.REPLY.unpack_from(got[0])[1] == wire.STATUS_ERROR:
                    assert wire.ERROR.unpack_from(got[0], wire.REPLY.size)[0] == errno.ENOMEM
                    break
                pins += 1
            assert 0 < pins < 99, f"{pins} pins of {MAX_RANGES} ranges each were taken"
            assert shared.map_count(0) == 1 + pins * MAX_RANGES
            local.release([lifeline])  # the daemon holds its own copies
            local.release([child_end])  # the child is gone: every pin it had goes
            assert wait_for(
                lambda: (
                    served.process.poll() is not None
                    or not any(info["pinned_children"] for info in client.stat())
                )
            )
            assert served.process.poll() is None, "the daemon died"
            assert shared.map_count(0) == 1
            assert bytes(mapping.view()[:4]) == b"kept"
            sock.close()
            assert wait_for(lambda: len(daemon_descriptors(served.process.pid)) == fds_before)
            mapping.close()
            shared.close()
    finally:
        local.close_all()
        served.stop()


def test_a_pin_holds_until_its_lifeline_reads_eof(daemon: Served) -> None:
    local = LocalFds()
    with connect(daemon.socket) as client:
        shared = client.open("pinned", PS, create=True)
        sock = raw_connection(daemon.socket)
        try:
            handle = open_on(sock, "pinned")
            assert handle is not None
            (lifeline,), (child_end,) = local.attach("pipe_read")
            pin = wire.request(wire.Op.PIN, 2, wire.pack_ranges(handle, [(0, PS)]))
            socket.send_fds(sock, [pin], [lifeline])
            local.release([lifeline])
            assert receive(sock) == (wire.ok(wire.Op.PIN, 2), 0)
            os.write(child_end, b"!")  # not EOF: the "child" is alive
            assert not wait_for(lambda: shared.map_count(0) != 1, 0.3), "the pin went"
            local.release([child_end])
            assert wait_for(lambda: shared.map_count(0) == 0)
        finally:
            sock.close()
            local.close_all()
            shared.close()
