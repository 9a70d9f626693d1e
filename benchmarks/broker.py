"""The broker's costs (``devanon serve``), each beside a baseline measured in the same run.

The benchmark starts its own daemon (``devanon serve --socket <tmpdir>/dv.sock``, from the
same venv as this Python), creates one 1 MiB object, and stops the daemon with SIGTERM at
the end, whatever happens. Baselines are tiny Python echo servers on their own
AF_UNIX SOCK_SEQPACKET sockets: they answer a request with an 8-byte reply, as the daemon
answers MAP, and swallow a message flagged FLAG_NOREPLY, as the daemon swallows a posted
UNMAP. Every request is the broker's MAP/UNMAP message (28 bytes) for one 4 KiB page.

(a) ``round_trip``: one map + unmap through the broker, per iteration (the garbage
    collector paused; ``time.perf_counter_ns`` around each iteration; iterations timed in
    blocks of one kind, blocks of every kind interleaved in rotating order, the first
    iteration of a block untimed so a block doesn't pay for the posted work of the one
    before). Median, min and mean are reported; ratios are of medians.

    - ``broker_map_unmap``: ``m = shared.map(0, 4096); m.close()`` (a MAP through the
      client's request ring and its reply, mmap, munmap, a posted UNMAP; the daemon punches
      the page);
    - ``broker_protocol``: ``client.map_one`` + ``client.post_unmap`` with no mmap: the
      broker's share without the client's syscalls;
    - diagnostic ``broker_map_unmap_socket``: ``broker_map_unmap`` from a client made with
      ``ring=False``: every request a socket message, as before the rings;
    - baseline ``bare_round_trip``: send a 28-byte request, wait for the 8-byte reply, to a
      server doing blocking recv/send on one connection (and ``_polling``: the same,
      waiting as devanon's client does; ``bare`` is the faster of the two).
      Target (the issue's "map+unmap round trip against a bare round trip, ratio <= 2"),
      on medians: ``same_work_ratio`` = broker_map_unmap / (bare + raw_syscalls), the
      same work without the broker, and ``protocol_ratio`` = broker_protocol / bare, the
      exchange alone. ``ratio`` = broker_map_unmap / bare puts the client's mmap and
      munmap against nothing; it is shown beside them.
    - diagnostics (no target): ``echo_epoll_round_trip`` (the same, to a selectors server
      shaped like the daemon), ``echo_epoll_pair`` (the broker's message pattern: request,
      reply, posted message), ``raw_syscalls`` (mmap + madvise + munmap of a 4 KiB memfd
      page through ``devanon._libc``: the client's syscalls alone), and the servers' CPU
      time per pair or round trip (``/proc/PID/schedstat``).

(b) ``throughput``: 1 and 8 client processes (spawned; each with its own connection), and
    8 started by forkserver and 8 forked (``START_METHODS``), each
    mapping and unmapping its own 4 KiB page of the one object in a loop for a fixed time;
    total map+unmap pairs per second (median of the rounds), beside the same processes
    doing the same message pattern (request, reply, posted message) against the selectors
    echo server. Also the servers' CPU share (1.0 = one core busy), the share of the time
    they were runnable but waited for a CPU, and CPU time per pair (server and clients).
    Target: >= 20,000 pairs/s with 8 clients (judged for each start method apart).
    Diagnostic row ``8_clients_spawned_fixed_layout``: 8 spawned with every process's
    address layout the same (``FIXED_LAYOUT``); ``same_layout`` says, for each row,
    whether the workers' executables lie at one address (``/proc/PID/maps``).
    ``8_clients_computing``: 8 spawned clients that compute (a Python loop, ~150 us here)
    before each pair, as a pipeline does, against the same loop without the pair: the
    iterations a second both ways and the daemon's CPU share (no target: it shows what the
    daemon takes from clients that have other work, ``devanon.broker.crowding``).

(c) ``verify``: the benchmark measured correct behaviour: the daemon's counts agree with
    the clients' /proc/PID/maps while they are connected, every pair punched its page once
    (``punch_calls`` = pairs made), and at the end every count is 0, the object is one run
    of zeros, and its resident bytes are 0 (also after a page was written).

Run from the repository root (full: about a minute; the machine should be otherwise idle)::

    .venv/bin/python benchmarks/broker.py [--quick] [--daemon-in-our-session] [-o FILE]

The daemon runs in a session of its own, as it would from another terminal or a service
manager; with the kernel's autogroup on, that makes it a scheduling group of its own (JSON:
``scheduling``). ``--daemon-in-our-session`` starts it in the benchmark's session, the clients'
group: a diagnosis of what the group costs (see README), not the configuration to quote.
``--quick`` is a smoke check of about ten seconds (few blocks, 0.5 s rounds), so its figures
are not the ones to quote. The JSON goes to stdout (and to FILE with ``-o``); progress goes to
stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from _common import Json, emit, gc_paused, log, machine, options, us

from devanon import _libc
from devanon.broker import Client, SharedAnon, connect
from devanon.broker import protocol as wire

KiB = 1 << 10
MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
PROT_RW = _libc.PROT_READ | _libc.PROT_WRITE
OBJECT = "bench-broker"
OBJECT_SIZE = MiB
"""Pages: 0 for the main process's ring client, ``SOCKET_PAGE`` for its socket-only client,
1 + i for worker i of 32 (each page has one user: every unmap brings its count to 0 and
the daemon punches it)."""
SOCKET_PAGE = OBJECT_SIZE // PAGE - 1
WORKER_WARMUP = 300
"""Broker pairs (and echo pairs) each worker makes before it says it is ready."""
COMPUTE_LOOP = 3000
"""Iterations of ``compute``'s loop: ~150 us of a client's CPU on this machine."""
KINDS = {"broker": "echo", "compute_broker": "compute"}
"""What the workers of (b) do, each beside its baseline: map + unmap against the echo
server's message pattern; ``compute`` then map + unmap against ``compute`` alone."""
MAPPING_KINDS = frozenset(KINDS)
ROUND_TRIP_TARGET = 2.0
THROUGHPUT_TARGET = 20_000
THROUGHPUT_CLIENTS = 8
START_METHODS = ("spawn", "forkserver", "fork")
"""How (b) starts its workers: multiprocessing's three ways on Linux. ``fork`` was its
default until Python 3.13, ``forkserver`` is from 3.14 (a server process, itself spawned,
imports this module and forks each worker), ``spawn`` starts a fresh interpreter (the
default on macOS and Windows). Forked workers, from either, share their parent's pages
(Python's code and objects) until they write them, so on 2 cores they cost the caches less
than spawned ones."""
FIXED_LAYOUT = "spawn_fixed_layout"
"""A diagnosis, not a way to quote: 8 workers spawned with the address layout of every
process the same (``ADDR_NO_RANDOMIZE``, as ``setarch -R`` runs a command), as forked
workers have it. The gap between spawned and forked workers is there, not in what they
share: switching between processes whose code lies at different addresses finds the
CPU's branch predictors trained for the other addresses, and on 2 cores 8 clients switch
every few microseconds."""
ROW_SUFFIX = {
    "spawn": "",
    "forkserver": "_forkserver",
    "fork": "_forked",
    FIXED_LAYOUT: "_spawned_fixed_layout",
}
"""The throughput rows' names: ``8_clients`` (spawned), ``8_clients_forkserver``, ..."""
ADDR_NO_RANDOMIZE = 0x0040000
"""personality(2)'s flag: no address space randomization for what this process execs."""


@dataclass(frozen=True, slots=True)
class Config:
    """Repetitions for one run."""

    block: int
    """Iterations timed back to back in one block of (a)."""
    blocks: int
    """Blocks of each kind in (a)."""
    duration_s: float
    """Length of one throughput run in (b)."""
    rounds: int
    """Throughput runs of each kind in (b)."""
    clients: tuple[int, ...] = (1, THROUGHPUT_CLIENTS)


FULL = Config(block=50, blocks=300, duration_s=3.0, rounds=3)
QUICK = Config(block=20, blocks=20, duration_s=0.5, rounds=1)


# -- helpers ------------------------------------------------------------------------------


def sched_s(pid: int) -> tuple[float, float]:
    """Seconds a single-threaded process has run on a CPU, and waited runnable for one
    (``/proc/PID/schedstat``, ns; without schedstats, CPU time in ticks and no wait)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        run, wait, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
        return int(run) / 1e9, int(wait) / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 0.0


def cpu_s(pid: int) -> float:
    """CPU time a single-threaded process has used, in seconds."""
    return sched_s(pid)[0]


def sleep_until(deadline: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)


def echo_messages(handle: int, offset: int) -> tuple[bytes, bytes]:
    """The broker's MAP request and posted UNMAP for one page: the baselines send these."""
    body = wire.pack_ranges(handle, [(offset, PAGE)])
    return (
        wire.request(wire.Op.MAP, 1, body),
        wire.request(wire.Op.UNMAP, 2, body, wire.FLAG_NOREPLY),
    )


def seqpacket(path: str, timeout: float = 20.0) -> socket.socket:
    """A connection to ``path``, retrying while the server starts."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# -- the processes: daemon, echo servers, workers -------------------------------------------


@dataclass
class DaemonProcess:
    """``devanon serve`` in a subprocess, its output in a log file."""

    socket_path: str
    log_path: Path
    own_session: bool = True
    """Start it in a session of its own, as from another terminal or a service manager: its
    own scheduling group (autogroup), like a systemd service's cgroup."""
    proc: subprocess.Popen[bytes] | None = None
    exit: Json = field(default_factory=dict)

    @staticmethod
    def executable() -> str:
        """The ``devanon`` script next to this Python (the venv's), else on PATH."""
        beside = Path(sys.executable).with_name("devanon")
        found = str(beside) if beside.exists() else shutil.which("devanon")
        if found is None:
            raise FileNotFoundError("no `devanon` script beside this Python or on PATH")
        return found

    def start(self, timeout: float = 20.0) -> None:
        command = [self.executable(), "serve", "--socket", self.socket_path]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=self.own_session
            )
        deadline = time.monotonic() + timeout
        while "listening on" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`{' '.join(command)}` did not start:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cpu_s(self) -> float:
        assert self.proc is not None
        return cpu_s(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not stopped in 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
            killed = False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            killed = True
        text = self.log()
        clean = self.proc.returncode == 0 and not killed and "devanon serve: stopped" in text
        trouble = [
            line
            for line in text.splitlines()
            if "Traceback" in line or " failed" in line or "cut off" in line
        ]
        self.exit |= {
            "returncode": self.proc.returncode,
            "killed_after_timeout": killed,
            "log_lines_with_errors": trouble[:10],
            "target": "stopped cleanly by SIGTERM, nothing failed or cut off in its log",
            "ok": clean and not trouble,
        }


def same_layout(pids: list[int]) -> bool:
    """Whether these processes have their first mapping (the Python executable's) at the
    same address (``/proc/PID/maps``): the kernel's word on ``FIXED_LAYOUT``."""
    starts = set()
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            starts.add(f.readline().split("-", 1)[0])
    return len(starts) == 1


@contextlib.contextmanager
def fixed_layout() -> Iterator[None]:
    """Processes this one starts meanwhile get the same address layout (``FIXED_LAYOUT``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    persona = libc.personality(0xFFFFFFFF)
    if persona == -1 or libc.personality(persona | ADDR_NO_RANDOMIZE) == -1:
        raise OSError(ctypes.get_errno(), "personality(ADDR_NO_RANDOMIZE)")
    try:
        yield
    finally:
        libc.personality(persona)


@contextlib.contextmanager
def running_daemon(directory: Path, own_session: bool = True) -> Iterator[DaemonProcess]:
    """A daemon for the benchmark, stopped with SIGTERM on the way out, always."""
    daemon = DaemonProcess(str(directory / "dv.sock"), directory / "daemon.log", own_session)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def echo_server(path: str, blocking: bool) -> None:
    """The baseline: an 8-byte reply to every message (none if FLAG_NOREPLY), nothing else.

    ``blocking``: recv/send on one connection at a time; else one selectors loop over every
    connection, one message per readiness, as the daemon does.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    if blocking:
        while True:
            conn, _ = listener.accept()
            with conn:
                while data := conn.recv(wire.MAX_MESSAGE):
                    if not data[2] & wire.FLAG_NOREPLY:
                        conn.send(data[:8])
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    conn, _ = listener.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, conn)
                continue
            conn = key.data
            try:
                data = conn.recv(wire.MAX_MESSAGE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                conn.close()
            elif not data[2] & wire.FLAG_NOREPLY:
                conn.send(data[:8])


def compute(n: int = COMPUTE_LOOP) -> int:
    """A client's own work between two maps (pure Python, no syscall)."""
    total = 0
    for i in range(n):
        total += i
    return total


def worker(index: int, daemon_path: str, echo_path: str, pipe: Connection) -> None:
    """One client process of (b): its own connections to the daemon and the echo server.

    Commands on ``pipe``: ``("run", kind, start, duration)`` (kind: one of ``KINDS``)
    answers ``("done", iterations, cpu_s)``; ``("stop",)`` closes everything and answers
    ``("closed", pairs_made)``.
    """
    try:
        gc.disable()
        client = connect(daemon_path)
        shared = client.open(OBJECT)
        offset = (1 + index) * PAGE
        echo = seqpacket(echo_path)
        request, posted = echo_messages(shared._handle, offset)

        def broker_pair() -> None:
            shared.map(offset, PAGE).close()

        def echo_pair() -> None:
            echo.send(request)
            echo.recv(wire.MAX_MESSAGE)
            echo.send(posted)

        def compute_broker_pair() -> None:
            compute()
            broker_pair()

        ops = {
            "broker": broker_pair,
            "echo": echo_pair,
            "compute_broker": compute_broker_pair,
            "compute": compute,
        }

        made = 0
        for _ in range(WORKER_WARMUP):
            broker_pair()
            echo_pair()
        made += WORKER_WARMUP
        pipe.send(("ready", os.getpid()))
        while True:
            command = pipe.recv()
            if command[0] == "stop":
                break
            _, kind, start, duration = command
            op = ops[kind]
            end = start + duration
            sleep_until(start)
            cpu0 = time.process_time()
            pairs = 0
            while time.monotonic() < end:
                op()
                pairs += 1
            pipe.send(("done", pairs, time.process_time() - cpu0))
            if kind in MAPPING_KINDS:
                made += pairs
        shared.close()  # a round trip: raises if the daemon refused a posted unmap
        client.close()
        echo.close()
        pipe.send(("closed", made))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise


def receive(pipe: Connection, what: str, timeout: float = 60.0) -> tuple[Any, ...]:
    """The next message from a worker; RuntimeError if it failed or says nothing."""
    if not pipe.poll(timeout):
        raise RuntimeError(f"a worker said nothing for {timeout:g} s while {what}")
    message: tuple[Any, ...] = pipe.recv()
    if message[0] == "error":
        raise RuntimeError(f"a worker failed while {what}:\n{message[1]}")
    return message


@contextlib.contextmanager
def processes() -> Iterator[list[BaseProcess]]:
    """Spawned helper processes, terminated on the way out if they are still running."""
    procs: list[BaseProcess] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


# -- (a) round trip -------------------------------------------------------------------------


def time_block(op: Callable[[], object], n: int) -> list[int]:
    """Run ``op`` once untimed, then ``n`` times, timing each call."""
    op()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        op()
        samples.append(clock() - t0)
    return samples


def interleave_blocks(cfg: Config, ops: dict[str, Callable[[], object]]) -> dict[str, list[int]]:
    """``cfg.blocks`` blocks of each op, rotating which goes first; samples per op."""
    names = list(ops)
    samples: dict[str, list[int]] = {name: [] for name in names}
    for i in range(cfg.blocks):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            samples[name] += time_block(ops[name], cfg.block)
    return samples


@dataclass
class Servers:
    """What (a) and (b) talk to."""

    daemon: DaemonProcess
    bare: BaseProcess
    bare_path: str
    epoll: BaseProcess
    epoll_path: str


def bench_round_trip(
    cfg: Config, servers: Servers, client: Client, shared: SharedAnon, socket_only: SharedAnon
) -> Json:
    """(a): map+unmap through the broker per iteration, against a bare round trip."""
    log(f"(a) round trip: {cfg.blocks} blocks of {cfg.block} iterations of each kind")
    handle = shared._handle
    request, posted = echo_messages(shared._handle, 0)
    bare = seqpacket(servers.bare_path)
    epoll = seqpacket(servers.epoll_path)
    raw_fd = os.memfd_create("bench-raw", os.MFD_CLOEXEC)
    os.ftruncate(raw_fd, PAGE)

    def broker_map_unmap() -> None:
        m = shared.map(0, PAGE)
        m.close()

    def broker_protocol() -> None:
        client.map_one(handle, 0, PAGE)
        client.post_unmap(handle, 0, PAGE)

    def broker_map_unmap_socket() -> None:
        # A page of its own: another connection's posted UNMAP of page 0 could be served
        # after this MAP (connections keep no order between them), and two pairs would
        # then share one punch.
        m = socket_only.map(SOCKET_PAGE * PAGE, PAGE)
        m.close()

    def bare_round_trip() -> None:
        bare.send(request)
        bare.recv(wire.MAX_MESSAGE)

    def bare_round_trip_polling() -> None:
        # The same, waiting for the reply as devanon's client does: polling for 200 us
        # before sleeping (a sleeping process takes ~100 us to wake on this VM).
        bare.send(request)
        deadline = time.perf_counter() + 200e-6
        while True:
            try:
                bare.recv(wire.MAX_MESSAGE, socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                if time.perf_counter() > deadline:
                    break
                os.sched_yield()
        bare.recv(wire.MAX_MESSAGE)

    def echo_epoll_round_trip() -> None:
        epoll.send(request)
        epoll.recv(wire.MAX_MESSAGE)

    def echo_epoll_pair() -> None:
        epoll.send(request)
        epoll.recv(wire.MAX_MESSAGE)
        epoll.send(posted)

    def raw_syscalls() -> None:
        address = _libc.mmap(0, PAGE, PROT_RW, _libc.MAP_SHARED, raw_fd, 0)
        _libc.munmap(address, PAGE)

    ops: dict[str, Callable[[], object]] = {
        "broker_map_unmap": broker_map_unmap,
        "broker_protocol": broker_protocol,
        "broker_map_unmap_socket": broker_map_unmap_socket,
        "bare_round_trip": bare_round_trip,
        "bare_round_trip_polling": bare_round_trip_polling,
        "echo_epoll_round_trip": echo_epoll_round_trip,
        "echo_epoll_pair": echo_epoll_pair,
        "raw_syscalls": raw_syscalls,
    }
    assert servers.bare.pid is not None and servers.epoll.pid is not None
    try:
        with gc_paused():
            warm = Config(cfg.block, max(2, cfg.blocks // 10), cfg.duration_s, cfg.rounds)
            interleave_blocks(warm, ops)
            cpu0 = servers.daemon.cpu_s(), cpu_s(servers.bare.pid), cpu_s(servers.epoll.pid)
            samples = interleave_blocks(cfg, ops)
            cpu1 = servers.daemon.cpu_s(), cpu_s(servers.bare.pid), cpu_s(servers.epoll.pid)
    finally:
        bare.close()
        epoll.close()
        os.close(raw_fd)
    per_kind = cfg.blocks * (cfg.block + 1)  # with each block's untimed first call
    pairs_made = 3 * (warm.blocks + cfg.blocks) * (cfg.block + 1)
    med = {name: us(s)[0] for name, s in samples.items()}
    rows = {
        name: {
            "median_us": round(m, 2),
            "min_us": round(us(samples[name])[1], 2),
            "mean_us": round(statistics.fmean(samples[name]) / 1e3, 2),
        }
        for name, m in med.items()
    }
    # The baseline is the faster of the two ways to wait for a bare reply.
    bare_key = min(("bare_round_trip", "bare_round_trip_polling"), key=lambda k: med[k])
    med["bare"] = med[bare_key]
    ratio = med["broker_map_unmap"] / med["bare"]
    mins = {name: us(s)[1] for name, s in samples.items()}
    mins["bare"] = min(mins["bare_round_trip"], mins["bare_round_trip_polling"])
    # The same work without the broker: the bare round trip, and the mmap and munmap that
    # SharedAnon.map + close make and a bare round trip does not.
    same_work = med["bare"] + med["raw_syscalls"]
    same_work_ratio = med["broker_map_unmap"] / same_work
    protocol_ratio = med["broker_protocol"] / med["bare"]
    return {
        "what": "per iteration, 4 KiB, one client; broker_map_unmap: SharedAnon.map(0, 4096) + "
        "Mapping.close() (through the request ring); broker_protocol: Client.map_one + "
        "Client.post_unmap, no mmap; broker_map_unmap_socket: broker_map_unmap by a client "
        "without a ring (every request a socket message); bare_round_trip: a 28-byte "
        "request and its 8-byte reply to a blocking recv/send echo server (_polling: the "
        "client polls 200 us before it sleeps, as devanon's does; the ratio uses the faster "
        "of the two); echo_epoll_*: to a selectors echo server (_pair: request, reply, a "
        "posted message); raw_syscalls: _libc mmap(MAP_SHARED) + munmap of a memfd page",
        "samples_per_kind": cfg.blocks * cfg.block,
        "block": cfg.block,
        **rows,
        "baseline": bare_key,
        "same_work_baseline_us": round(same_work, 2),
        "same_work_ratio": round(same_work_ratio, 3),
        "same_work_ratio_of_mins": round(
            mins["broker_map_unmap"] / (mins["bare"] + mins["raw_syscalls"]), 3
        ),
        "protocol_ratio": round(protocol_ratio, 3),
        "ratio": round(ratio, 3),
        "ratio_of_mins": round(mins["broker_map_unmap"] / mins["bare"], 3),
        "target": f"same_work_ratio (broker_map_unmap / (bare + raw_syscalls)) and "
        f"protocol_ratio (broker_protocol / bare) <= {ROUND_TRIP_TARGET:g}, medians; "
        "ratio (broker_map_unmap / bare: the client's mmap and munmap against nothing) is "
        "shown beside them",
        "ok": same_work_ratio <= ROUND_TRIP_TARGET and protocol_ratio <= ROUND_TRIP_TARGET,
        "socket_only_ratio": round(med["broker_map_unmap_socket"] / med["bare"], 3),
        "protocol_vs_echo_pair_ratio": round(med["broker_protocol"] / med["echo_epoll_pair"], 3),
        "breakdown_us": {
            "bare_round_trip": round(med["bare_round_trip"], 1),
            "epoll_server_and_posted_message": round(
                med["echo_epoll_pair"] - med["bare_round_trip"], 1
            ),
            "broker_protocol_beyond_echo_pair": round(
                med["broker_protocol"] - med["echo_epoll_pair"], 1
            ),
            "client_syscalls": round(med["raw_syscalls"], 1),
            "client_mapper_bookkeeping": round(
                med["broker_map_unmap"] - med["broker_protocol"] - med["raw_syscalls"], 1
            ),
        },
        "server_cpu_us": {
            "daemon_per_pair": round((cpu1[0] - cpu0[0]) / (3 * per_kind) * 1e6, 1),
            "bare_echo_per_round_trip": round((cpu1[1] - cpu0[1]) / per_kind * 1e6, 1),
            "epoll_echo_per_message": round((cpu1[2] - cpu0[2]) / (3 * per_kind) * 1e6, 1),
        },
        "_pairs_made": pairs_made,
    }


# -- (b) throughput -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Round:
    """One timed run of (b)."""

    pairs: int
    clients_cpu_s: float
    server_cpu_s: float
    server_wait_s: float
    """Time the server was runnable but waited for a CPU."""


def run_round(kind: str, pipes: list[Connection], server_pid: int, duration: float) -> Round:
    """One timed run of ``len(pipes)`` workers against the server ``server_pid``."""
    start = time.monotonic() + 0.3
    for pipe in pipes:
        pipe.send(("run", kind, start, duration))
    sleep_until(start)
    run0, wait0 = sched_s(server_pid)
    sleep_until(start + duration)
    run1, wait1 = sched_s(server_pid)
    done = [receive(pipe, f"running {kind}", duration + 60) for pipe in pipes]
    return Round(sum(d[1] for d in done), sum(d[2] for d in done), run1 - run0, wait1 - wait0)


def bench_throughput(
    cfg: Config, servers: Servers, procs: list[BaseProcess], pipes: list[Connection]
) -> Json:
    """(b): pairs/s with 1 and 8 client processes, broker against the echo server.

    The workers' processes go into ``procs`` and their pipes into ``pipes``: they stay up
    for (c).
    """
    nworkers = max(cfg.clients)
    methods = (*START_METHODS, FIXED_LAYOUT)
    log(f"(b) throughput: starting {nworkers} client processes each way: {methods}")
    groups: dict[str, list[Connection]] = {}
    layouts: dict[str, bool] = {}
    for method in methods:
        ctx = mp.get_context("spawn" if method == FIXED_LAYOUT else method)
        group = groups[method] = []
        with fixed_layout() if method == FIXED_LAYOUT else contextlib.nullcontext():
            for _ in range(nworkers):
                i = len(pipes)
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=worker,
                    args=(i, servers.daemon.socket_path, servers.epoll_path, theirs),
                    name=f"bench-worker-{i}",
                    daemon=True,
                )
                proc.start()
                procs.append(proc)
                theirs.close()
                pipes.append(ours)
                group.append(ours)
        layouts[method] = same_layout([p.pid for p in procs[-nworkers:] if p.pid])
    for pipe in pipes:
        receive(pipe, "starting", 120)
    assert servers.daemon.proc is not None and servers.epoll.pid is not None
    daemon_pid = servers.daemon.proc.pid
    server_pid = {kind: daemon_pid for kind in ("broker", "compute_broker", "compute")}
    server_pid["echo"] = servers.epoll.pid
    sets = [
        *(("spawn", n, "broker") for n in cfg.clients),
        *((m, nworkers, "broker") for m in (*START_METHODS[1:], FIXED_LAYOUT)),
        ("spawn", nworkers, "compute_broker"),
    ]
    runs = [(k, method, n) for method, n, kind in sets for k in (kind, KINDS[kind])]
    results: dict[tuple[str, str, int], list[Round]] = {r: [] for r in runs}
    for r in range(cfg.rounds):
        for j in range(len(runs)):
            kind, method, n = runs[(r + j) % len(runs)]
            log(
                f"(b) round {r + 1}/{cfg.rounds}: {kind}, {n} {method}ed client(s), "
                f"{cfg.duration_s:g} s"
            )
            results[kind, method, n].append(
                run_round(kind, groups[method][:n], server_pid[kind], cfg.duration_s)
            )
    rows: Json = {}
    for method, n, mapping in sets:
        row: Json = {"clients": n, "start_method": method}
        row["same_layout"] = layouts[method] if n > 1 else None
        rates = {}
        for kind in (mapping, KINDS[mapping]):
            rounds = results[kind, method, n]
            per_s = [r.pairs / cfg.duration_s for r in rounds]
            pairs = sum(r.pairs for r in rounds)
            rates[kind] = statistics.median(per_s)
            row[kind] = {
                "pairs_per_s": round(rates[kind]),
                "pairs_per_s_rounds": [round(x) for x in per_s],
                "server_cpu_share": round(
                    statistics.median(r.server_cpu_s / cfg.duration_s for r in rounds), 2
                ),
                "server_wait_share": round(
                    statistics.median(r.server_wait_s / cfg.duration_s for r in rounds), 2
                ),
                "server_cpu_us_per_pair": round(
                    sum(r.server_cpu_s for r in rounds) / pairs * 1e6, 1
                ),
                "clients_cpu_us_per_pair": round(
                    sum(r.clients_cpu_s for r in rounds) / pairs * 1e6, 1
                ),
            }
        row["ratio"] = round(rates[mapping] / rates[KINDS[mapping]], 3)
        if mapping == "compute_broker":
            row["compute_us"] = round((os.cpu_count() or 1) / rates["compute"] * 1e6, 1)
            row["target"] = None
            row["ok"] = None
            rows[f"{n}_clients_computing"] = row
            continue
        if n == THROUGHPUT_CLIENTS and method != FIXED_LAYOUT:
            row["target"] = f"broker pairs_per_s >= {THROUGHPUT_TARGET}"
            row["ok"] = rates["broker"] >= THROUGHPUT_TARGET
        else:
            row["target"] = None
            row["ok"] = None
        rows[f"{n}_clients{ROW_SUFFIX[method]}"] = row
    return {
        "what": "client processes (started by multiprocessing's spawn, forkserver (its "
        "default on Linux from Python 3.14) or fork (its default before)), each its own "
        "connection and its own 4 KiB page "
        "of the one object, looping for a fixed time (spawned_fixed_layout: spawned with "
        "ADDR_NO_RANDOMIZE, a diagnosis; same_layout: the workers' executables at one "
        "address); broker: SharedAnon.map + "
        "Mapping.close; echo: request, 8-byte reply, posted message to the selectors echo "
        "server; pairs_per_s: the median of the rounds; server_cpu_share: the server "
        "process's CPU time / wall time (1.0 = one core); server_wait_share: the time it "
        "was runnable but waiting for a CPU / wall time (/proc/PID/schedstat); "
        "8_clients_computing: each iteration is compute() (a Python loop) then, for "
        "compute_broker, one pair; pairs_per_s counts iterations, and compute_us is the CPU "
        "an iteration of compute alone takes (CPUs / its rate; the daemon idle)",
        "duration_s": cfg.duration_s,
        "rounds": cfg.rounds,
        "cpus": os.cpu_count(),
        **rows,
    }


def stop_workers(pipes: list[Connection]) -> int:
    """Tell every worker to close and exit; the broker pairs they made in all."""
    for pipe in pipes:
        pipe.send(("stop",))
    return sum(int(receive(pipe, "closing")[1]) for pipe in pipes)


# -- (c) verify -----------------------------------------------------------------------------


def object_state(client: Client) -> Json:
    """The object as the daemon's stat shows it."""
    (info,) = client.stat(OBJECT)
    state: Json = info
    return state


def check_written_page(shared: SharedAnon, client: Client) -> tuple[int, int]:
    """Write a page through the broker, close it: resident bytes before and after close."""
    m = shared.map(0, PAGE)
    ctypes.memset(m.address, 1, PAGE)
    written = int(object_state(client)["resident_bytes"])
    m.close()
    return written, int(object_state(client)["resident_bytes"])  # stat: after the UNMAP


# -- the run --------------------------------------------------------------------------------


def autogroup(pid: int) -> str:
    """The scheduling group of a process's session (``/proc/PID/autogroup``; "" if none)."""
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().split()[0]
    except (OSError, IndexError):
        return ""


def autogroup_enabled() -> bool:
    """Whether the kernel puts each session in a scheduling group of its own."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def run(cfg: Config, directory: Path, result: Json, own_session: bool = True) -> None:
    """Everything between starting the servers and stopping them; fills ``result``."""
    ctx = mp.get_context("spawn")
    with running_daemon(directory, own_session) as daemon, processes() as procs:
        result["daemon"] = daemon.exit  # filled in when it stops
        assert daemon.proc is not None
        result["scheduling"] = {
            "daemon_own_session": own_session,
            "daemon_autogroup": autogroup(daemon.proc.pid),
            "clients_autogroup": autogroup(os.getpid()),
            "autogroup_enabled": autogroup_enabled(),
            "what": "daemon_own_session: the daemon was started in a session of its own (the "
            "default: as from another terminal or a service manager), so with autogroup on it "
            "is a scheduling group of its own, like a systemd service's cgroup, and while it "
            "polls it holds a CPU that its yields cannot hand to the clients' group (README); "
            "false with --daemon-in-our-session",
        }
        bare_path, epoll_path = str(directory / "bare.sock"), str(directory / "epoll.sock")
        bare = ctx.Process(target=echo_server, args=(bare_path, True), daemon=True)
        epoll = ctx.Process(target=echo_server, args=(epoll_path, False), daemon=True)
        for proc in (bare, epoll):
            proc.start()
            procs.append(proc)
        servers = Servers(daemon, bare, bare_path, epoll, epoll_path)
        with (
            connect(daemon.socket_path) as client,
            Client(daemon.socket_path, ring=False) as socket_client,
        ):
            shared = client.open(OBJECT, OBJECT_SIZE, create=True)
            socket_only = socket_client.open(OBJECT)
            round_trip = bench_round_trip(cfg, servers, client, shared, socket_only)
            socket_only.close()
            pairs_made = round_trip.pop("_pairs_made")
            result["round_trip"] = round_trip
            pipes: list[Connection] = []
            result["throughput"] = bench_throughput(cfg, servers, procs, pipes)
            log("(c) verify")
            # While the workers are still connected (nothing mapped): the daemon's counts
            # against every client's /proc/PID/maps, and one punch per pair made.
            differences = client.verify(OBJECT)
            live = object_state(client)
            pairs_made += stop_workers(pipes)
            written, after_close = check_written_page(shared, client)
            pairs_made += 1
            used = [*range(1 + len(pipes)), SOCKET_PAGE]
            counts = [shared.map_count(i * PAGE) for i in used]
            final = object_state(client)
            shared.close()
        result["verify"] = {
            "what": "after (a) and (b): the daemon's counts against the clients' "
            "/proc/PID/maps (workers still connected); punch_calls against the pairs made; "
            "then, workers gone, every page's count, the runs, mapped and resident bytes; "
            "and a page written then closed",
            "differences_while_connected": differences,
            "clients_holding_bytes_while_connected": [
                c for c in live["clients"] if c["mapped_bytes"]
            ],
            "pairs_made": pairs_made,
            "punch_calls": final["punch_calls"],
            "freed_bytes": final["freed_bytes"],
            "map_counts_of_used_pages": counts,
            "count_runs": final["count_runs"],
            "mapped_bytes": final["mapped_bytes"],
            "resident_bytes": final["resident_bytes"],
            "resident_bytes_written_page": written,
            "resident_bytes_after_its_close": after_close,
            "clients_left": len(final["clients"]),
            "target": "no differences, punch_calls == pairs_made, every count 0, one run, "
            "mapped and resident bytes 0",
            "ok": not differences
            and final["punch_calls"] == pairs_made
            and not any(counts)
            and final["count_runs"] == 1
            and final["mapped_bytes"] == 0
            and final["resident_bytes"] == 0
            and written == PAGE
            and after_close == 0,
        }


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark and print the JSON."""
    args = options(
        __doc__,
        argv,
        lambda p: p.add_argument(
            "--daemon-in-our-session",
            action="store_true",
            help="start the daemon in this session, the clients' scheduling group (a diagnosis)",
        ),
    )
    cfg = QUICK if args.quick else FULL
    # SIGTERM (like Ctrl-C) unwinds, so that the daemon and helpers are stopped on the way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    start = time.perf_counter()
    result: Json = {"benchmark": "devanon broker", "quick": args.quick, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="devanon-bench-") as tmp:
        run(cfg, Path(tmp), result, own_session=not args.daemon_in_our_session)
    emit(result, start, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
