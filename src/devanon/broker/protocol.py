"""The broker's wire format (docs/protocol.md is the reference for other languages).

One request or reply per SOCK_SEQPACKET message, little-endian, at most ``MAX_MESSAGE``
bytes. A request is an 8-byte header ``op u8, 0 u8, flags u16, seq u32`` and a body; a reply
is ``op u8, status u8, 0 u16, seq u32`` and a body. Status 0 is success; status 1 is an
error whose body is ``errno i32`` and a UTF-8 message. Fixed bodies are packed structs;
stat and verify replies carry UTF-8 JSON. File descriptors travel as SCM_RIGHTS.
"""

from __future__ import annotations

import array
import enum
import socket
import struct
from dataclasses import dataclass

MAX_MESSAGE = 64 << 10
MAX_NAME = 255

HEADER = struct.Struct("<BxHI")
REPLY = struct.Struct("<BBxxI")
ERROR = struct.Struct("<i")
OPEN = struct.Struct("<QIB")
"""size (0: don't care), mode, flags (OPEN_CREATE | OPEN_WRITABLE | OPEN_EXCLUSIVE); then
the name."""
OPENED = struct.Struct("<IQIIII")
"""handle, size, page_size, owner uid, owner gid, mode; and the memfd as SCM_RIGHTS."""
HANDLE = struct.Struct("<I")
RANGE = struct.Struct("<QQ")
"""offset, length in bytes; MAP, UNMAP and PIN bodies are a handle and 1.. ranges."""
COUNT = struct.Struct("<IQ")
"""handle, offset; the reply is one u64."""
U64 = struct.Struct("<Q")
MAP_ONE = struct.Struct("<BxHIIQQ")
"""A whole MAP or UNMAP request of one range: the hot path, parsed in one step."""

OPEN_CREATE = 1
OPEN_WRITABLE = 2
OPEN_EXCLUSIVE = 4
"""With OPEN_CREATE: EEXIST if the name exists (as O_EXCL): a creator then knows the
object is its own, not one that another user made first under the name it expected."""
FLAG_NOREPLY = 1
"""On UNMAP: reply only if it fails (unmaps may be pipelined)."""
FLAG_AFTER = 2
"""On STAT and VERIFY: list a page, as many entries as one reply holds, from a cursor in
the body (STAT: the objects whose names sort after the body's, from the first if it is
empty; VERIFY: a ``U64`` page index, then the name: the differences from that page on);
an empty page ends the listing."""

FLAG_GIVE_BACK = 4
"""On UNMAP (of one range, with NOREPLY): it gives back the MAP with the same seq, whose
answer its client stopped waiting for (interrupted); if the daemon refused that MAP,
there is nothing to give back and the UNMAP is dropped (it would take the count of
another mapping of the same pages). A daemon that predates the flag treats it as a plain
UNMAP."""

STATUS_OK = 0
STATUS_ERROR = 1


class Op(enum.IntEnum):
    """Request codes."""

    OPEN = 1
    MAP = 2
    UNMAP = 3
    CLOSE = 4
    UNLINK = 5
    STAT = 6
    VERIFY = 7
    PIN = 8
    COUNT = 9
    SYNC = 10
    """A barrier: its reply comes after every earlier request was done."""
    RING = 11
    """Ask for a request ring (``devanon.broker.ring``); the reply carries its memfd."""
    WAKE = 12
    """A ring's doorbell, either way: no body, never answered."""


class ProtocolError(ValueError):
    """A request that does not parse: the daemon answers EPROTO and changes nothing."""


@dataclass(slots=True, frozen=True)
class Request:
    op: Op
    flags: int
    seq: int
    body: bytes


def parse_request(message: bytes) -> Request:
    """Split a message into header and body; ProtocolError if it can't be one."""
    if len(message) < HEADER.size:
        raise ProtocolError(f"a request is at least {HEADER.size} bytes, not {len(message)}")
    op, flags, seq = HEADER.unpack_from(message)
    try:
        code = Op(op)
    except ValueError:
        raise ProtocolError(f"unknown op {op}") from None
    return Request(code, flags, seq, message[HEADER.size :])


def request(op: Op, seq: int, body: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(op, flags, seq) + body


def ok(op: int, seq: int, body: bytes = b"") -> bytes:
    return REPLY.pack(op, STATUS_OK, seq) + body


def error(op: int, seq: int, errno: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace")[: MAX_MESSAGE - REPLY.size - ERROR.size]
    return REPLY.pack(op, STATUS_ERROR, seq) + ERROR.pack(errno) + text


def name_of(raw: bytes) -> str:
    """An object name from the wire: 1..255 bytes of UTF-8, no NUL and no '/'."""
    if not 0 < len(raw) <= MAX_NAME:
        raise ProtocolError(f"a name is 1 to {MAX_NAME} bytes, not {len(raw)}")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"a name is UTF-8, not {raw[:32]!r}") from None
    if "\0" in name or "/" in name:
        raise ProtocolError(f"a name has no NUL and no '/': {name!r}")
    return name


MAX_RANGES = (MAX_MESSAGE - HEADER.size - HANDLE.size) // RANGE.size
"""The most ranges one MAP, UNMAP or PIN message holds (4,095)."""


def pack_ranges(handle: int, ranges: list[tuple[int, int]]) -> bytes:
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"{len(ranges)} ranges: a message holds at most {MAX_RANGES}")
    return HANDLE.pack(handle) + b"".join(RANGE.pack(o, n) for o, n in ranges)


def unpack_ranges(body: bytes) -> tuple[int, list[tuple[int, int]]]:
    """``handle, [(offset, length), ...]`` from a MAP/UNMAP/PIN body."""
    rest = len(body) - HANDLE.size
    if rest <= 0 or rest % RANGE.size:
        raise ProtocolError(f"a range body is a handle and 16-byte ranges, not {len(body)} bytes")
    (handle,) = HANDLE.unpack_from(body)
    return handle, [RANGE.unpack_from(body, HANDLE.size + i) for i in range(0, rest, RANGE.size)]


MAX_FDS = 4
"""The most descriptors a message may carry."""
ANCILLARY = socket.CMSG_SPACE(MAX_FDS * 4)
"""Room for the descriptors a message may carry."""


def descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
    return fds
