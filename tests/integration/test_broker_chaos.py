"""Chaos: broker clients killed at arbitrary points, with the kernel as the oracle.

One daemon serves the whole test. The test process is the *survivor*: it maps and writes some
pages of the object "chaos" (two of them twice, four with ``inherit=True``, so every worker
it forks holds a pin) and keeps them mapped throughout. Then, round after round, it forks 4-6
worker processes (each the leader of its own process group) that connect on their own,
open "chaos" (sometimes twice) and sometimes an object of their own (sometimes unlinked while
in use), and loop over random map / write / unmap of part of a mapping / overlay of a file /
release of an overlay / close, on random page ranges that often overlap the survivor's
pages, with a request that changes nothing (COUNT, SYNC, STAT) now and then, and sometimes a
CLOSE of a whole handle or an UNLINK in the middle. Now and then a worker forks a child that
keeps ``inherit=True`` mappings (pinned by the daemon until the child and its descendants
are gone), and a child may map pages on a connection of its own and fork a grandchild that
outlives it. Each worker meets a fate drawn from a seeded ``random.Random`` per round:

- SIGKILL after a random delay (so it dies anywhere: mid-request, mid-fork, mid-write),
  alone (its descendants live on, orphaned) or with its whole process group;
- SIGSTOP for a moment, then SIGKILL, or SIGCONT and a normal exit;
- a normal exit after a number of steps, abrupt (``os._exit`` with everything mapped) or
  clean (everything closed, sometimes its object unlinked);
- a *tripwire*: it SIGKILLs itself at a chosen point of the protocol: a MAP sent but its
  mmap not made, the mmap made but the daemon's yes not read, munmap done but the UNMAP not
  posted, the UNMAP posted, fork done but the PIN not sent, the PIN sent but not answered,
  an OPEN, CLOSE or UNLINK sent but not answered.

While they run, every process checks what it can see: a page it has mapped (and written)
since it was written still holds its bytes (every writer of a page writes the same bytes, so
this holds whatever the others do: a page under a live mapping is never punched); the
survivor's pages read the survivor's bytes; an overlay shows its file; a forked child and
grandchild still see what they inherited after their parent has died (the pin holds).

After each round, once every worker and every descendant is dead and reaped (the test
process is a child subreaper, so orphans come back to it), and the daemon has had up to a
few seconds to notice:

- no process reported a failed check or an exception, and every worker exited with 0 or
  died of SIGKILL (one that should exit by itself does so within EXIT_TIMEOUT);
- the daemon is alive, lists only the survivor as a client of "chaos" and no pinned child;
- every page's count is exactly what the survivor maps (COUNT of each page), and VERIFY
  against the survivor's /proc/PID/maps finds no difference;
- the survivor's bytes read back unchanged, and the memfd holds exactly the survivor's pages:
  ``st_blocks`` is their size and SEEK_DATA / SEEK_HOLE find data on exactly those pages
  (everything the dead workers wrote elsewhere was punched);
- no object a worker unlinked is listed, the objects left over have no count, no resident
  byte and no pin, and the daemon's memfd descriptors are exactly those of the listed
  objects (an unlinked object that nobody uses any more has been closed);
- once the leftovers are unlinked, the daemon holds exactly the descriptors it held before
  the round (no leaked client socket, pidfd, lifeline or memfd), and logged no failure.

Two bugs turned up while writing this test; each has a focused regression test at the end:
a fork pinned the child's inherited pages only after ``fork()``, so a parent killed in
between left them to be punched under the child (now the PIN is sent before the fork); and
a stale epoll event of a client that died disconnected a client accepted in the same batch
of events under the same descriptor number.

Over all rounds, workers must have been killed and have exited, tripwires fired, orphans
checked their pages, objects been unlinked: the chaos really happened.
``DEVANON_CHAOS_SEED`` and ``DEVANON_CHAOS_ROUNDS`` change the seed and the number of rounds.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import os
import random
import re
import select
import signal
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from broker_daemon import Served, daemon_descriptors, wait_for
from support import data_pages

from devanon.broker import Client, SharedAnon, connect
from devanon.broker import protocol as wire
from devanon.mapper import Mapping, Overlay

PS = os.sysconf("SC_PAGE_SIZE")
SEED = int(os.environ.get("DEVANON_CHAOS_SEED", "20040117"))
ROUNDS = int(os.environ.get("DEVANON_CHAOS_ROUNDS", "24"))

CHAOS = "chaos"
CHAOS_PAGES = 32
OWN_PAGES = 16
OVERLAY_PAGES = 8
SURVIVOR_MAPS = ((2, 3, False), (12, 4, True), (14, 2, False))
"""(first page, pages, inherit) of the survivor's mappings: pages 14 and 15 are mapped twice,
and 12..15 are inherited (and so pinned) by every worker the test process forks."""
STAMP_SIZE = 32
"""Bytes a worker writes at the start of a page (and reads back)."""
MAX_RUN = 6
"""The most pages one random mapping, unmap or overlay spans."""
MAX_HELD = 10
"""The most mappings a worker keeps at once (it closes one before mapping more)."""

WORKER_LIFETIME = 4.0
"""Seconds a worker runs at most, whatever its fate (it exits by itself then)."""
GO_TIMEOUT = 3.0
"""Seconds a forked child waits for its parent's word that the fork is done."""
EXIT_TIMEOUT = 15.0
"""Seconds a worker that should exit by itself gets to do so before the round fails."""
GRACE = 1.0
"""Seconds the descendants of the workers get to finish by themselves."""
REAP_TIMEOUT = 5.0
"""Seconds to reap everything once it was SIGKILLed."""
SETTLE = 5.0
"""Seconds the daemon gets to notice the deaths (it does so asynchronously)."""
DAEMON_TROUBLE = ("Traceback", "failed", "cannot accept", "out of them", "cut off")
"""What the daemon logs only when something went wrong (server.py's warnings and errors)."""

FATES = (
    "kill",
    "kill",
    "kill-group",
    "stop-kill",
    "stop-continue",
    "exit",
    "exit-clean",
    "tripwire",
    "tripwire",
)
EXITING_FATES = ("stop-continue", "exit", "exit-clean")
"""Fates that end in a normal exit (exit code 0)."""
KILLED_FATES = ("kill", "kill-group", "tripwire")
"""Fates whose SIGKILL comes at the plan's delay (a tripwire may strike first); "kill-group"
kills the worker's descendants with it."""
TRIPWIRES: dict[str, tuple[int, int]] = {
    "map-sent": (wire.Op.MAP, 30),
    "map-mapped": (wire.Op.MAP, 30),
    "unmap-unsent": (wire.Op.UNMAP, 20),
    "unmap-sent": (wire.Op.UNMAP, 20),
    "pin-unsent": (wire.Op.PIN, 2),
    "pin-sent": (wire.Op.PIN, 2),
    "open-sent": (wire.Op.OPEN, 3),
    "close-sent": (wire.Op.CLOSE, 1),
    "unlink-sent": (wire.Op.UNLINK, 1),
}
"""Where a tripwire worker kills itself: the request it concerns and the most occurrences
of that request to let by first (the one to die at is drawn from 1 up to this)."""

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
_libc = ctypes.CDLL(None, use_errno=True)
MEMFD_LINK = re.compile(r"^/memfd:devanon:(.*) \(deleted\)$")


# -- what pages hold ---------------------------------------------------------------------


def survivor_page(page: int) -> bytes:
    """The bytes the survivor writes into (the whole of) a page of "chaos"."""
    return (f"survivor page {page}|".encode() * (PS // 16))[:PS]


def stamp(name: str, page: int) -> bytes:
    """The bytes every worker writes at the start of page ``page`` of object ``name``."""
    return f"{name}#{page:04d}".encode().ljust(STAMP_SIZE, b".")[:STAMP_SIZE]


SURVIVOR_PAGES = frozenset(
    page for first, pages, _ in SURVIVOR_MAPS for page in range(first, first + pages)
)


def expected_counts() -> list[int]:
    """Each page's count of "chaos" when only the survivor maps it."""
    counts = [0] * CHAOS_PAGES
    for first, pages, _ in SURVIVOR_MAPS:
        for page in range(first, first + pages):
            counts[page] += 1
    return counts


def read(address: int, length: int) -> bytes:
    """Bytes of this process's memory."""
    return ctypes.string_at(address, length)


def write(address: int, data: bytes) -> None:
    """Write bytes into this process's memory."""
    ctypes.memmove(address, data, len(data))


def make_overlay_file(path: Path) -> str:
    """A file whose page ``i`` starts with ``stamp("overlay", i)``."""
    path.write_bytes(b"".join(stamp("overlay", i).ljust(PS, b"\0") for i in range(OVERLAY_PAGES)))
    return str(path)


# -- processes -----------------------------------------------------------------------------


def prctl(option: int, value: int) -> None:
    """prctl(2) with one integer argument; OSError if it fails."""
    zero = ctypes.c_ulong(0)
    if _libc.prctl(option, ctypes.c_ulong(value), zero, zero, zero) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}, {value}): {os.strerror(code)}")


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process a child subreaper for one test: orphaned descendants of the workers
    are reparented to it, so it can reap them and know they are gone."""
    old = ctypes.c_int(0)
    zero = ctypes.c_ulong(0)
    _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(old), zero, zero, zero)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, old.value)


def fork_process(body: Callable[[], int], *, group: bool = False) -> int:
    """Fork a process that runs ``body`` and exits with its code (1 if it raised: the
    traceback goes to stderr). It never returns into the caller's code (pytest's, say).
    With ``group``, it leads a process group of its own and dies with its parent."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if group:
                os.setpgid(0, 0)
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            code = body()
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            os._exit(code)
    if group:
        with contextlib.suppress(OSError):  # it may have done so, or died, already
            os.setpgid(pid, pid)
    return pid


def wait_readable(fd: int, timeout: float) -> bool:
    """True once ``fd`` is readable (data or EOF), False after ``timeout`` seconds."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def read_within(fd: int, n: int, timeout: float) -> bytes:
    """Up to ``n`` bytes from a pipe, b"" at EOF; RuntimeError after ``timeout`` seconds."""
    if not wait_readable(fd, timeout):
        raise RuntimeError(f"nothing to read on fd {fd} within {timeout} s")
    return os.read(fd, n)


def describe_status(status: int) -> str:
    """A wait status in words."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def reap_group(pgid: int, deadline: float) -> bool:
    """Reap every process of group ``pgid`` that is (or becomes) our child; True once none
    is left, False at ``deadline``. As a subreaper we inherit orphans: when no process of
    the group is our child any more, the group is gone."""
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)


def group_exists(pgid: int) -> bool:
    """True while any process of group ``pgid`` exists (zombies included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the daemon from outside -----------------------------------------------------------------


def daemon_memfds(pid: int) -> Counter[str]:
    """The names of the objects whose memfd the daemon holds open."""
    names: Counter[str] = Counter()
    for link in daemon_descriptors(pid).values():
        match = MEMFD_LINK.match(link)
        if match:
            names[match.group(1)] += 1
    return names


# -- the survivor --------------------------------------------------------------------------


@dataclass
class Survivor:
    """The test process's own mappings of "chaos": written once, kept mapped throughout."""

    shared: SharedAnon
    mappings: list[tuple[Mapping, int]] = field(default_factory=list)
    """Each mapping and the first page it maps."""

    @classmethod
    def start(cls, shared: SharedAnon) -> Survivor:
        survivor = cls(shared)
        for first, pages, inherit in SURVIVOR_MAPS:
            m = shared.map(first * PS, pages * PS, inherit=inherit)
            for i in range(pages):
                write(m.address + i * PS, survivor_page(first + i))
            survivor.mappings.append((m, first))
        return survivor

    def inherited(self) -> tuple[int, int, int]:
        """(address, first page, pages) of the mapping every forked worker inherits."""
        for m, first in self.mappings:
            if m.inherit:
                return m.address, first, m.length // PS
        raise AssertionError("the survivor has no inherited mapping")

    def damaged_pages(self) -> list[int]:
        """Pages whose bytes (read through every mapping of them) are not the survivor's."""
        return sorted(
            first + i
            for m, first in self.mappings
            for i in range(m.length // PS)
            if read(m.address + i * PS, PS) != survivor_page(first + i)
        )

    def close(self) -> None:
        """Unmap everything (the end of the test)."""
        for m, _ in self.mappings:
            m.close()


# -- a worker's plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one worker does and what becomes of it."""

    label: str
    seed: int
    fate: str
    delay: float
    """Seconds after the round's start when the fate (kill or stop) strikes."""
    pause: float
    """Seconds a stopped worker stays stopped."""
    steps: int
    own: str | None
    """The name of the object it makes for itself, if any."""
    unlink_at: int | None
    """The step at which it unlinks that object, if it does."""
    close_at: int | None
    """The step at which it closes a handle (its own object's, or its second of "chaos")."""
    second_handle: bool
    fork_rate: float
    tripwire: tuple[str, int] | None
    """(point, occurrence) at which it SIGKILLs itself."""


def plan_round(rng: random.Random, round_no: int) -> list[Plan]:
    """The workers of one round."""
    plans = []
    for index in range(rng.randint(4, 6)):
        fate = rng.choice(FATES)
        own = f"chaos-r{round_no}-w{index}" if rng.random() < 0.6 else None
        tripwire = None
        if fate == "tripwire":
            point = rng.choice(sorted(TRIPWIRES))
            tripwire = (point, rng.randint(1, TRIPWIRES[point][1]))
            if point == "unlink-sent" and own is None:
                own = f"chaos-r{round_no}-w{index}"
        point = tripwire[0] if tripwire else ""
        steps = 10**9
        if fate in EXITING_FATES:
            steps = rng.randint(300, 600) if fate == "stop-continue" else rng.randint(30, 250)
        plans.append(
            Plan(
                label=f"round {round_no} worker {index} ({fate})",
                seed=rng.randrange(2**32),
                fate=fate,
                delay=rng.uniform(0.005, 0.4),
                pause=rng.uniform(0.01, 0.08),
                steps=steps,
                own=own,
                unlink_at=(
                    rng.randint(0, 120)
                    if own and (point == "unlink-sent" or rng.random() < 0.6)
                    else None
                ),
                close_at=(
                    rng.randint(0, 30 if point == "close-sent" else 150)
                    if point == "close-sent" or rng.random() < 0.3
                    else None
                ),
                second_handle=point == "close-sent" or rng.random() < 0.25,
                fork_rate=0.15 if tripwire and tripwire[0].startswith("pin") else 0.02,
                tripwire=tripwire,
            )
        )
    return plans


# -- reporting from workers and their descendants ----------------------------------------------


@dataclass
class Reporter:
    """Lines to the test over a pipe every worker and descendant shares: ``ERR`` (an oracle
    failed or something raised), ``EVENT`` (facts)."""

    fd: int
    who: str

    def send(self, kind: str, text: str) -> None:
        line = f"{kind} {self.who} (pid {os.getpid()}): {text}".replace("\n", " | ")
        data = line.encode("utf-8", "replace")[: select.PIPE_BUF - 1] + b"\n"
        with contextlib.suppress(OSError):  # a full pipe: the test has enough to go on
            os.write(self.fd, data)

    def error(self, text: str) -> None:
        """An oracle failed, or something raised: the round fails."""
        self.send("ERR", text)


def read_reports(fd: int, timeout: float) -> list[str]:
    """Every line sent on the report pipe until EOF (every writer is dead by now)."""
    os.set_blocking(fd, False)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wait_readable(fd, 0.1)
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").splitlines()


# -- tripwires ---------------------------------------------------------------------------------


def die() -> None:
    """SIGKILL this process, here and now."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # not reached: the signal is delivered as the syscall returns


def arm_tripwire(
    client: Client, point: str, occurrence: int, report: Reporter | None = None
) -> None:
    """Make ``client`` kill its process at ``point`` of its ``occurrence``-th request of the
    kind the point concerns (see ``TRIPWIRES``), saying so to ``report`` first."""
    op = TRIPWIRES[point][0]

    def die_here() -> None:
        if report is not None:
            report.send("EVENT", f"tripwire {point}")
        die()

    transmit, send_one, await_reply = client._transmit, client._send_one, client._await
    seen = 0
    armed_after_mmap = False
    inside_send_one = False

    def tripped(kind: int, send: Callable[[], bool]) -> bool:
        """Send one request of ``kind`` (on the socket or through the ring), dying where
        the tripwire says."""
        nonlocal seen, armed_after_mmap
        if kind != op:
            return send()
        seen += 1
        if seen == occurrence and point.endswith("-unsent"):
            die_here()  # the munmap (or fork) is done; the daemon never hears of it
        sent = send()
        if seen == occurrence:
            if point == "map-mapped":
                armed_after_mmap = True  # die once the mmap is made, before the yes is read
            else:
                die_here()
        return sent

    def tripped_transmit(message: bytes, fds: list[int] | None) -> None:
        if inside_send_one:  # counted by tripped_send_one
            transmit(message, fds)
            return
        tripped(message[0], lambda: bool(transmit(message, fds)))

    def tripped_send_one(kind: wire.Op, *args: int) -> bool:
        nonlocal inside_send_one
        inside_send_one = True
        try:
            return tripped(kind, lambda: send_one(kind, *args))
        finally:
            inside_send_one = False

    def tripped_await(seq: int, via_ring: bool = False) -> tuple[bytes, list[int]]:
        if armed_after_mmap:
            die_here()
        return await_reply(seq, via_ring)

    client._transmit = tripped_transmit  # type: ignore[method-assign]
    client._send_one = tripped_send_one  # type: ignore[method-assign,assignment]
    client._await = tripped_await  # type: ignore[method-assign]


# -- a worker ------------------------------------------------------------------------------


@dataclass(eq=False)
class Held:
    """One of a worker's mappings, and what it knows its pages hold."""

    obj: SharedAnon
    mapping: Mapping
    mapped: set[int]
    """Indices (pages from the mapping's start) still mapped."""
    expect: dict[int, bytes] = field(default_factory=dict)
    """Index -> the bytes its page must start with (mapped, not overlaid, since written)."""
    overlaid: set[int] = field(default_factory=set)

    def address(self, index: int) -> int:
        """Where page ``index`` of the mapping is in memory."""
        return self.mapping.address + index * PS

    def page(self, index: int) -> int:
        """The object's page that page ``index`` of the mapping shows."""
        return self.mapping.offset // PS + index


@dataclass(eq=False)
class Placed:
    """An overlay a worker laid over pages ``indices`` of one of its mappings."""

    overlay: Overlay
    held: Held
    indices: set[int]


def contiguous_run(rng: random.Random, indices: set[int]) -> list[int]:
    """A random run of consecutive indices out of ``indices`` (at most MAX_RUN long)."""
    start = rng.choice(sorted(indices))
    run = [start]
    while run[-1] + 1 in indices and len(run) < MAX_RUN:
        run.append(run[-1] + 1)
    return run[: rng.randint(1, len(run))]


class ChaosWorker:
    """One worker: random map / write / unmap / overlay / fork on "chaos" and its own object,
    checking every page it knows the bytes of."""

    def __init__(
        self,
        plan: Plan,
        socket_path: str,
        report: Reporter,
        overlay_path: str,
        survivor_inherited: tuple[int, int, int],
    ) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.report = report
        self.overlay_path = overlay_path
        self.survivor_inherited = survivor_inherited
        self.held: list[Held] = []
        self.placed: list[Placed] = []
        self.children: list[int] = []
        self.forks = 0
        self.own: SharedAnon | None = None
        self.unlinked = False
        self.client = connect(socket_path)
        if plan.tripwire:
            arm_tripwire(self.client, *plan.tripwire, report)
        self.chaos = self.client.open(CHAOS)
        self.objects = [self.chaos]
        if plan.second_handle:
            self.objects.append(self.client.open(CHAOS))
        if plan.own:
            self.own = self.client.open(plan.own, OWN_PAGES * PS, create=True)
            self.report.send("EVENT", f"created {plan.own}")
            self.objects.append(self.own)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Steps until the plan's count or the lifetime runs out, then exit (maybe clean)."""
        deadline = time.monotonic() + WORKER_LIFETIME
        self.check_survivor_inherited()
        for step in range(self.plan.steps):
            if time.monotonic() > deadline:
                break
            if step == self.plan.unlink_at:
                self.unlink_own()
            if step == self.plan.close_at:
                self.close_object()
            self.step()
            self.reap_children()
        if self.plan.fate == "exit-clean":
            self.close_everything()
        return 0

    def step(self) -> None:
        """One random operation."""
        roll = self.rng.random()
        if not self.held or (roll < 0.35 and len(self.held) < MAX_HELD):
            self.map_random()
        elif roll < 0.55:
            self.close_random()
        elif roll < 0.65:
            self.unmap_part()
        elif roll < 0.75:
            self.overlay_part()
        elif roll < 0.82:
            self.release_overlay()
        elif roll < 0.82 + self.plan.fork_rate and self.forks < 3:
            self.fork_child()
        elif roll < 0.92:
            self.check(self.rng.choice(self.held))
            self.check_survivor_inherited()
        else:
            self.query()

    # -- what pages must hold ------------------------------------------------------------

    def fill(self, held: Held, indices: Iterable[int]) -> None:
        """Pages just (re)mapped: check the survivor's, stamp the others if writable."""
        for i in indices:
            page = held.page(i)
            if held.obj.name == CHAOS and page in SURVIVOR_PAGES:
                held.expect[i] = survivor_page(page)[:STAMP_SIZE]
                self.check(held, [i])
            elif held.mapping.writable:
                held.expect[i] = stamp(held.obj.name, page)
                write(held.address(i), held.expect[i])

    def check(self, held: Held, indices: Iterable[int] | None = None) -> None:
        """Every page of ``held`` whose bytes are known must still hold them."""
        for i in sorted(held.expect) if indices is None else indices:
            want = held.expect.get(i)
            if want is not None and (got := read(held.address(i), len(want))) != want:
                self.report.error(
                    f"page {held.page(i)} of {held.obj.name!r}, mapped all along, reads "
                    f"{got!r}, not {want!r}"
                )

    def check_survivor_inherited(self) -> None:
        """The survivor's inherited mapping (pinned for us) shows the survivor's bytes."""
        address, first, pages = self.survivor_inherited
        for i in range(pages):
            want = survivor_page(first + i)[:STAMP_SIZE]
            if (got := read(address + i * PS, STAMP_SIZE)) != want:
                self.report.error(f"survivor page {first + i}, inherited, reads {got!r}")

    # -- operations -------------------------------------------------------------------------

    def map_random(self) -> None:
        """Map a random range of one of our objects (often over the survivor's pages)."""
        obj = self.rng.choice(self.objects)
        npages = obj.size // PS
        first = self.rng.randrange(npages)
        pages = self.rng.randint(1, min(MAX_RUN, npages - first))
        writable = self.rng.random() < 0.75
        inherit = self.rng.random() < 0.15
        m = obj.map(first * PS, pages * PS, writable=writable, inherit=inherit)
        held = Held(obj, m, set(range(pages)))
        self.held.append(held)
        self.fill(held, range(pages))

    def close_random(self) -> None:
        """Check and close one of our mappings (whatever is left of it)."""
        held = self.held.pop(self.rng.randrange(len(self.held)))
        self.check(held)
        held.mapping.close()
        self.placed = [p for p in self.placed if p.held is not held]

    def unmap_part(self) -> None:
        """munmap a run of pages out of one mapping (cutting it, maybe under an overlay)."""
        held = self.rng.choice(self.held)
        run = contiguous_run(self.rng, held.mapped)
        self.check(held, run)
        held.obj.unmap(held.address(run[0]), len(run) * PS)
        for i in run:
            held.mapped.discard(i)
            held.overlaid.discard(i)
            held.expect.pop(i, None)
        for placed in self.placed:
            if placed.held is held:
                placed.indices.difference_update(run)
        self.placed = [p for p in self.placed if p.indices]
        if not held.mapped:
            self.held.remove(held)

    def overlay_part(self) -> None:
        """Lay the overlay file over a run of pages not overlaid yet; it must show."""
        candidates = [h for h in self.held if h.mapped - h.overlaid]
        if not candidates:
            return
        held = self.rng.choice(candidates)
        run = contiguous_run(self.rng, held.mapped - held.overlaid)
        file_page = self.rng.randrange(OVERLAY_PAGES - len(run) + 1)
        overlay = held.obj.overlay(
            held.address(run[0]), self.overlay_path, file_page * PS, len(run) * PS
        )
        for k, i in enumerate(run):
            held.expect.pop(i, None)
            held.overlaid.add(i)
            if (got := read(held.address(i), STAMP_SIZE)) != stamp("overlay", file_page + k):
                self.report.error(f"an overlay of file page {file_page + k} reads {got!r}")
        self.placed.append(Placed(overlay, held, set(run)))

    def release_overlay(self) -> None:
        """Map the object back under an overlay; those pages count (and are stamped) again."""
        live = [p for p in self.placed if not p.overlay.released]
        if not live:
            return
        placed = self.rng.choice(live)
        placed.overlay.release()
        self.placed.remove(placed)
        placed.held.overlaid.difference_update(placed.indices)
        self.fill(placed.held, sorted(placed.indices))

    def query(self) -> None:
        """A request that changes nothing: COUNT, SYNC (which raises late unmap errors) or
        STAT."""
        kind = self.rng.randrange(3)
        if kind == 0:
            self.chaos.map_count(self.rng.randrange(CHAOS_PAGES) * PS)
        elif kind == 1:
            self.chaos.flush()
        else:
            self.client.stat(CHAOS)

    def unlink_own(self) -> None:
        """Unlink our own object (still in use, maybe) and tell the test."""
        if self.own is not None and not self.unlinked:
            self.client.unlink(self.own.name)
            self.unlinked = True
            self.report.send("EVENT", f"unlinked {self.own.name}")

    def close_object(self) -> None:
        """CLOSE one of our handles other than the first of "chaos" (it unmaps all of it)."""
        if len(self.objects) < 2:
            return
        obj = self.rng.choice(self.objects[1:])
        for held in [h for h in self.held if h.obj is obj]:
            self.check(held)
            self.held.remove(held)
        self.placed = [p for p in self.placed if p.held.obj is not obj]
        obj.close()
        self.objects.remove(obj)

    def close_everything(self) -> None:
        """A clean exit: check, close every object, maybe unlink our own."""
        for held in self.held:
            self.check(held)
        self.held.clear()
        for obj in self.objects:
            obj.close()
        if self.rng.random() < 0.5:
            self.unlink_own()
        self.client.close()
        self.report.send("EVENT", "closed everything")

    def reap_children(self) -> None:
        """Reap the children that have exited (the others are reaped by the test)."""
        with contextlib.suppress(ChildProcessError):
            while self.children and os.waitpid(-1, os.WNOHANG)[0]:
                pass

    # -- fork ------------------------------------------------------------------------------

    def fork_child(self) -> None:
        """Map and stamp pages with ``inherit=True``, fork a child that keeps them, then
        tell the child the fork (and so the PIN) is done."""
        first = self.rng.randrange(CHAOS_PAGES - 2)
        pages = self.rng.randint(1, min(MAX_RUN, CHAOS_PAGES - first))
        m = self.chaos.map(first * PS, pages * PS, inherit=True)
        held = Held(self.chaos, m, set(range(pages)))
        self.held.append(held)
        self.fill(held, range(pages))
        self.forks += 1
        child_seed = self.rng.randrange(2**32)
        go_r, go_w = os.pipe()

        def child() -> int:
            os.close(go_w)
            self.report = Reporter(self.report.fd, f"{self.plan.label}, child")
            try:
                return self.as_child(go_r, random.Random(child_seed))
            except BaseException:
                self.report.error(traceback.format_exc())
                return 1

        pid = fork_process(child)
        os.close(go_r)
        os.write(go_w, b"g")
        os.close(go_w)
        self.children.append(pid)

    def check_inherited(self) -> None:
        """In a descendant: what it inherited still holds its bytes."""
        for held in self.held:
            if held.mapping.inherit:
                self.check(held)
        self.check_survivor_inherited()

    def as_child(self, go_r: int, rng: random.Random) -> int:
        """A forked child: check what it inherited, outlive its parent for a moment, maybe
        map pages on a connection of its own, maybe fork a grandchild that outlives it."""
        worker = os.getppid()
        wait_readable(go_r, GO_TIMEOUT)  # "g", or EOF: the parent died inside fork()
        os.close(go_r)  # either way the pages were pinned before the fork
        self.check_inherited()
        time.sleep(rng.uniform(0, 0.1))
        self.check_inherited()
        if rng.random() < 0.4:
            self.map_on_own_connection(rng)
        if rng.random() < 0.3:
            parent = os.getpid()
            self.children = [fork_process(lambda: self.as_grandchild(parent))]
        time.sleep(rng.uniform(0, 0.1))
        self.check_inherited()
        if os.getppid() != worker:
            self.report.send("EVENT", "orphan checked what it inherited")
        return 0

    def map_on_own_connection(self, rng: random.Random) -> None:
        """A child maps pages of "chaos" itself (its first request reconnects)."""
        self.chaos.map_count(0)
        first = rng.randrange(CHAOS_PAGES - 1)
        pages = rng.randint(1, min(MAX_RUN, CHAOS_PAGES - first))
        m = self.chaos.map(first * PS, pages * PS)
        held = Held(self.chaos, m, set(range(pages)))
        self.fill(held, range(pages))
        time.sleep(rng.uniform(0, 0.05))
        self.check(held)
        if rng.random() < 0.5:
            m.close()

    def as_grandchild(self, parent: int) -> int:
        """A grandchild: once its parent is gone, what it inherited must still be there
        (the worker's pin holds until every descendant is gone)."""
        self.report = Reporter(self.report.fd, f"{self.plan.label}, grandchild")
        try:
            deadline = time.monotonic() + 2.0
            while os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.005)
            self.check_inherited()
            if os.getppid() != parent:
                self.report.send("EVENT", "grandchild checked what it inherited")
        except BaseException:
            self.report.error(traceback.format_exc())
            return 1
        return 0


def worker_main(
    plan: Plan,
    socket_path: str,
    report_fd: int,
    overlay_path: str,
    survivor_inherited: tuple[int, int, int],
) -> int:
    """A worker process's whole life; its exit code (errors also go to the report pipe)."""
    report = Reporter(report_fd, plan.label)
    try:
        return ChaosWorker(plan, socket_path, report, overlay_path, survivor_inherited).run()
    except BaseException:
        report.error(traceback.format_exc())
        return 1


# -- a round, from the test's side -----------------------------------------------------------


@dataclass
class Round:
    """One round's workers and what came of them."""

    number: int
    plans: list[Plan]
    pids: list[int] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)

    def lines(self, kind: str) -> list[str]:
        """The reports of one kind, without it: "who (pid N): text"."""
        return [line[len(kind) + 1 :] for line in self.reports if line.startswith(kind + " ")]

    def events(self) -> list[str]:
        """The text of every EVENT report (who sent it left out)."""
        return [line.split("): ", 1)[-1] for line in self.lines("EVENT")]

    @property
    def unlinked(self) -> set[str]:
        """The objects workers said they unlinked."""
        return {text.split()[1] for text in self.events() if text.startswith("unlinked ")}

    def tally(self) -> Counter[str]:
        """What happened, to show the chaos was real: deaths, exits, tripwires, orphans."""
        seen: Counter[str] = Counter()
        for status in self.statuses.values():
            seen["killed" if os.WIFSIGNALED(status) else "exited"] += 1
        for text in self.events():
            for what in ("tripwire", "orphan", "grandchild", "unlinked", "closed everything"):
                seen[what] += text.startswith(what)
        return seen


def start_workers(
    rnd: Round, socket_path: str, report_w: int, overlay_path: str, survivor: Survivor
) -> None:
    """Fork one process group per worker."""
    inherited = survivor.inherited()
    for plan in rnd.plans:

        def body(plan: Plan = plan) -> int:
            return worker_main(plan, socket_path, report_w, overlay_path, inherited)

        rnd.pids.append(fork_process(body, group=True))


def apply_fates(rnd: Round, started: float) -> None:
    """Kill, stop and continue the workers on schedule (they are not reaped yet, so their
    pids cannot have been reused)."""
    events = [
        (started + p.delay, i, "kill") for i, p in enumerate(rnd.plans) if p.fate in KILLED_FATES
    ]
    events += [(started + p.delay, i, "stop") for i, p in enumerate(rnd.plans) if "stop" in p.fate]
    heapq.heapify(events)
    while events:
        when, i, action = heapq.heappop(events)
        time.sleep(max(0.0, when - time.monotonic()))
        plan, pid = rnd.plans[i], rnd.pids[i]
        with contextlib.suppress(ProcessLookupError):
            if action == "kill" and plan.fate == "kill-group":
                os.killpg(pid, signal.SIGKILL)
            elif action == "kill":
                os.kill(pid, signal.SIGKILL)
            elif action == "stop":
                os.kill(pid, signal.SIGSTOP)
                after = "kill" if plan.fate == "stop-kill" else "cont"
                heapq.heappush(events, (when + plan.pause, i, after))
            else:
                os.kill(pid, signal.SIGCONT)


def wait_for_workers(rnd: Round) -> None:
    """Reap each worker: those killed at once, those that exit by themselves within
    EXIT_TIMEOUT (one that does not is a problem, and is killed)."""
    deadline = time.monotonic() + EXIT_TIMEOUT
    for plan, pid in zip(rnd.plans, rnd.pids, strict=True):
        killed = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rnd.statuses[pid] = status
                break
            if time.monotonic() > deadline:
                if killed:
                    rnd.problems.append(f"{plan.label} could not be reaped")
                    break  # kill_and_reap tries again
                rnd.problems.append(f"{plan.label} did not exit within {EXIT_TIMEOUT} s")
                os.kill(pid, signal.SIGKILL)
                killed, deadline = True, time.monotonic() + REAP_TIMEOUT
            time.sleep(0.005)


def check_exit_statuses(rnd: Round) -> None:
    """A worker exits with 0 or dies of SIGKILL (its fate or a tripwire); nothing else."""
    for plan, pid in zip(rnd.plans, rnd.pids, strict=True):
        status = rnd.statuses.get(pid)
        if status is None:
            continue
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        exited = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if plan.fate in EXITING_FATES and not exited:
            rnd.problems.append(f"{plan.label}: {describe_status(status)}, not a normal exit")
        elif not (killed or exited):
            rnd.problems.append(f"{plan.label}: {describe_status(status)}")


def end_descendants(rnd: Round) -> None:
    """Let the workers' descendants finish by themselves for GRACE seconds, then SIGKILL
    whatever is left and reap it all."""
    grace = time.monotonic() + GRACE
    for pid in rnd.pids:
        reap_group(pid, grace)
    kill_and_reap(rnd.pids, rnd.problems)


def kill_and_reap(pgids: list[int], problems: list[str]) -> None:
    """SIGKILL every process of the groups ``pgids`` and reap them (the finally-block path
    too: nothing of a round outlives it)."""
    deadline = time.monotonic() + REAP_TIMEOUT
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    for pgid in pgids:
        while not reap_group(pgid, min(deadline, time.monotonic() + 0.2)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)  # a fork may have raced the first one
            if time.monotonic() > deadline:
                problems.append(f"process group {pgid} could not be reaped")
                break
        if group_exists(pgid):
            problems.append(f"process group {pgid} still has processes after reaping")


def run_round(rnd: Round, daemon: Served, overlay_path: str, survivor: Survivor) -> None:
    """Start the workers, deal out their fates, and see every one of them (and every
    descendant) dead and reaped; collect what they reported."""
    report_r, report_w = os.pipe()
    os.set_blocking(report_w, False)
    try:
        try:
            start_workers(rnd, daemon.socket, report_w, overlay_path, survivor)
            apply_fates(rnd, time.monotonic())
            wait_for_workers(rnd)
            end_descendants(rnd)
        finally:
            kill_and_reap(rnd.pids, rnd.problems)
            os.close(report_w)
        rnd.reports = read_reports(report_r, REAP_TIMEOUT)
    finally:
        os.close(report_r)
    check_exit_statuses(rnd)


# -- the oracles ------------------------------------------------------------------------------


def chaos_settled(client: Client) -> bool:
    """The daemon has dropped every dead worker: only the survivor holds "chaos", unpinned."""
    (info,) = client.stat(CHAOS)
    return (
        [c["pid"] for c in info["clients"]] == [os.getpid()]
        and info["pinned_children"] == 0
        and info["mapped_bytes"] == len(SURVIVOR_PAGES) * PS
    )


def check_after_round(
    rnd: Round, client: Client, survivor: Survivor, daemon: Served, baseline: dict[int, str]
) -> None:
    """Every oracle of the module docstring, once the round's processes are all gone."""
    where = f"seed {SEED}, round {rnd.number}"
    shared = survivor.shared
    settled = wait_for(lambda: chaos_settled(client), timeout=SETTLE)
    assert daemon.process.poll() is None, f"{where}: the daemon died"
    assert not rnd.problems, f"{where}: {rnd.problems}"
    assert not rnd.lines("ERR"), f"{where}: workers reported:\n" + "\n".join(rnd.lines("ERR"))
    (info,) = client.stat(CHAOS)
    assert settled, f"{where}: the daemon did not drop the dead workers: {info}"
    assert client.verify(CHAOS) == [], f"{where}: counts differ from /proc/PID/maps"
    counts = [shared.map_count(page * PS) for page in range(CHAOS_PAGES)]
    assert counts == expected_counts(), f"{where}: counts {counts}"
    assert survivor.damaged_pages() == [], f"{where}: the survivor's bytes changed"
    assert data_pages(shared.fd, shared.size, PS) == set(SURVIVOR_PAGES), f"{where}: not punched"
    assert shared.resident_bytes() == len(SURVIVOR_PAGES) * PS, f"{where}: resident bytes"
    check_leftover_objects(rnd, client, daemon, where)
    pid = daemon.process.pid
    held = wait_for(lambda: daemon_descriptors(pid) == baseline, timeout=SETTLE)
    assert held, f"{where}: daemon descriptors {daemon_descriptors(pid)}, before {baseline}"
    log = daemon.read_log()
    assert not any(word in log for word in DAEMON_TROUBLE), f"{where}: the daemon logged {log}"


def leftovers_settled(client: Client, daemon: Served) -> bool:
    """The workers' objects hold nothing any more (their pins go asynchronously) and the
    daemon keeps no memfd of an unlinked one."""
    listed = client.stat()
    names = Counter(info["name"] for info in listed)
    return daemon_memfds(daemon.process.pid) == names and all(
        (info["mapped_bytes"], info["pinned_children"], info["clients"]) == (0, 0, [])
        for info in listed
        if info["name"] != CHAOS
    )


def check_leftover_objects(rnd: Round, client: Client, daemon: Served, where: str) -> None:
    """No unlinked object is listed or kept open; the workers' objects that are left hold
    nothing; then unlink them, and the daemon keeps only "chaos" open."""
    wait_for(lambda: leftovers_settled(client, daemon), timeout=SETTLE)
    listed = {info["name"]: info for info in client.stat()}
    planned = {p.own for p in rnd.plans if p.own}
    assert set(listed) <= {CHAOS} | planned, f"{where}: objects {sorted(listed)}"
    assert not set(listed) & rnd.unlinked, f"{where}: unlinked objects listed"
    for name in set(listed) - {CHAOS}:
        info = listed[name]
        left = (info["mapped_bytes"], info["resident_bytes"], info["pinned_children"])
        assert left == (0, 0, 0), f"{where}: {name} left {info}"
        assert info["clients"] == [], f"{where}: {name} still has clients {info['clients']}"
    memfds = daemon_memfds(daemon.process.pid)
    assert memfds == Counter(list(listed)), f"{where}: the daemon holds memfds {memfds}"
    for name in set(listed) - {CHAOS}:
        client.unlink(name)
    assert daemon_memfds(daemon.process.pid) == Counter([CHAOS])


# -- the test ------------------------------------------------------------------------------


def test_clients_killed_anywhere_leave_exactly_the_survivors_pages(
    daemon: Served, tmp_path: Path, subreaper: None
) -> None:
    overlay_path = make_overlay_file(tmp_path / "overlay")
    seen: Counter[str] = Counter()
    with connect(daemon.socket) as client:
        shared = client.open(CHAOS, CHAOS_PAGES * PS, create=True)
        survivor = Survivor.start(shared)
        baseline = daemon_descriptors(daemon.process.pid)
        daemon.read_log()
        for number in range(ROUNDS):
            rnd = Round(number, plan_round(random.Random(SEED * 1000 + number), number))
            run_round(rnd, daemon, overlay_path, survivor)
            check_after_round(rnd, client, survivor, daemon, baseline)
            seen += rnd.tally()
        survivor.close()
        assert shared.resident_bytes() == 0 and shared.map_count(12 * PS) == 0
        shared.close()
    if ROUNDS >= 8:  # the chaos happened: deaths, exits, tripwires, orphans that checked
        for what in ("killed", "exited", "tripwire", "orphan", "unlinked", "closed everything"):
            assert seen[what] > 0, f"seed {SEED}: no {what!r} in {ROUNDS} rounds: {seen}"


# -- regression tests for the bugs found -------------------------------------------------------


def _orphan_maker(socket_path: str, report_w: int, go_r: int) -> int:
    """A client that maps a page with inherit=True, writes it, and forks; it is killed as
    soon as devanon's after-fork hook runs in the parent (where the PIN used to be sent).
    Its child reports its pid once the parent is dead, waits for the word, then reports what
    the page reads."""
    client = connect(socket_path)
    obj = client.open("pin-race")
    m = obj.map(0, PS, inherit=True)
    write(m.address, b"inherited")
    alive_r, alive_w = os.pipe()
    obj._forked = lambda lifeline: die()  # type: ignore[method-assign]
    if os.fork() == 0:
        try:
            os.close(alive_w)
            wait_readable(alive_r, 10)  # EOF: the parent is dead
            os.write(report_w, f"{os.getpid():>10}".encode())
            wait_readable(go_r, 10)
            os.write(report_w, read(m.address, 9))
        finally:
            os._exit(0)
    return 3  # not reached: the tripwire killed us


def test_a_child_keeps_its_inherited_pages_when_its_parent_dies_inside_fork(
    daemon: Served, subreaper: None
) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("pin-race", 4 * PS, create=True)
        report_r, report_w = os.pipe()
        go_r, go_w = os.pipe()
        parent = fork_process(lambda: _orphan_maker(daemon.socket, report_w, go_r))
        os.close(report_w)
        os.close(go_r)
        child = 0
        try:
            _, status = os.waitpid(parent, 0)
            if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                raise RuntimeError(f"the forking client was not killed: {status}")
            child = int(read_within(report_r, 10, 10) or b"0")
            if not child:
                raise RuntimeError("no child was forked")
            gone = wait_for(lambda: [c["pid"] for c in obj.stats().clients] == [os.getpid()])
            if not gone:
                raise RuntimeError("the daemon did not notice the forking client's death")
            os.write(go_w, b"g")
            seen = read_within(report_r, 9, 10)
            os.waitpid(child, 0)
            child = 0
            assert seen == b"inherited", f"the child's inherited page reads {seen!r}"
            assert obj.resident_bytes() == 0, "a page with count 0 stays resident"
        finally:
            if child:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
            os.close(report_r)
            os.close(go_w)
        obj.close()


def _connect_then_hang_up(socket_path: str, report_w: int, go_r: int) -> int:
    """A client that connects (and is served), then closes its socket while it lives on,
    then exits: each step when the test says so."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(socket_path)
    sock.send(wire.request(wire.Op.SYNC, 1))
    sock.recv(wire.MAX_MESSAGE)
    os.write(report_w, b"c")
    read_within(go_r, 1, 10)
    sock.close()
    os.write(report_w, b"h")
    read_within(go_r, 1, 10)
    return 0


def wait_stopped(pid: int, timeout: float = 5.0) -> bool:
    """True once process ``pid`` is stopped (state T in /proc/PID/stat)."""

    def stopped() -> bool:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    return wait_for(stopped, timeout)


def test_a_client_accepted_as_another_dies_is_not_cut_off(daemon: Served) -> None:
    """Made deterministic by stopping the daemon: while it is stopped, A hangs up (its
    socket reads EOF), B connects and sends a request, then A exits (its pidfd is readable);
    the daemon then finds all three in one batch, in that order."""
    pid = daemon.process.pid
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    a = fork_process(lambda: _connect_then_hang_up(daemon.socket, report_w, go_r))
    os.close(report_w)
    os.close(go_r)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.settimeout(5)
    try:
        if read_within(report_r, 1, 10) != b"c":
            raise RuntimeError("client A did not connect")
        os.kill(pid, signal.SIGSTOP)
        if not wait_stopped(pid):
            raise RuntimeError("the daemon did not stop")
        os.write(go_w, b"1")
        if read_within(report_r, 1, 10) != b"h":
            raise RuntimeError("client A did not hang up")
        b.connect(daemon.socket)
        b.send(wire.request(wire.Op.SYNC, 7))
        os.write(go_w, b"2")
        os.waitpid(a, 0)
        a = 0
        os.kill(pid, signal.SIGCONT)
        try:
            reply = b.recv(wire.MAX_MESSAGE)
        except ConnectionResetError as e:
            reply = repr(e).encode()
        assert reply == wire.ok(wire.Op.SYNC, 7), f"client B got {reply!r}, not its reply"
    finally:
        os.kill(pid, signal.SIGCONT)
        if a:
            os.kill(a, signal.SIGKILL)
            os.waitpid(a, 0)
        b.close()
        os.close(report_r)
        os.close(go_w)
    with connect(daemon.socket) as client:
        assert client.stat() == []
