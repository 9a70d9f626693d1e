"""The broker with real processes: sharing, crashes, permissions, the kernel's maps as oracle."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import mmap
import multiprocessing
import os
import pickle
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from broker_daemon import Served, busy_cpus, daemon_descriptors, start_daemon, wait_for
from support import (
    data_pages,
    interrupt_after_next_mmap,
    interrupt_once,
    kernel_counts,
    run_child,
    start_child,
    unmap_every_mapping_of,
)

import devanon
from devanon.broker import BrokerError, Client, connect, daemon_log
from devanon.broker import protocol as wire
from devanon.broker.crowding import CrowdWatch

PS = os.sysconf("SC_PAGE_SIZE")
FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


def worker(target: Callable[..., None], *args: Any) -> tuple[Any, Connection]:
    """A forked process running ``target(conn, *args)``; returns it and our end of a pipe."""
    ours, theirs = FORK.Pipe()
    proc = FORK.Process(target=target, args=(theirs, *args), daemon=True)
    proc.start()
    return proc, ours


def _share_and_write(conn: Connection, path: str) -> None:
    with connect(path) as client, client.open("shared") as obj:
        m = obj.map(0, 8 * PS)
        assert bytes(m.view()[:6]) == b"parent"
        m.view()[PS : PS + 5] = b"child"
        conn.send("written")
        conn.recv()  # hold the mapping until told
        m.close()


def test_two_processes_share_and_see_each_others_writes(daemon: Served) -> None:
    with devanon.connect(daemon.socket) as client:  # the issue's name for it
        obj = client.open("shared", 16 * PS, create=True)
        a = obj.map(0, 8 * PS)
        a.view()[:6] = b"parent"
        proc, conn = worker(_share_and_write, daemon.socket)
        assert conn.recv() == "written"
        assert bytes(a.view()[PS : PS + 5]) == b"child"
        assert obj.map_count(0) == 2
        assert kernel_counts(obj.fd, [os.getpid(), proc.pid]) == dict.fromkeys(range(8), 2)
        assert client.verify("shared") == []
        # A unmaps while B still maps: nothing punched, the data stays
        a.close()
        assert obj.map_count(0) == 1
        assert obj.resident_bytes() == 2 * PS
        b = obj.map(0, 2 * PS)
        assert bytes(b.view()[:6]) == b"parent"
        b.close()
        conn.send("done")
        proc.join(10)
        assert proc.exitcode == 0
        assert wait_for(lambda: obj.map_count(0) == 0)
        assert obj.resident_bytes() == 0
        obj.close()


def _map_write_and_hang(conn: Connection, path: str) -> None:
    client = connect(path)
    obj = client.open("crash")
    m = obj.map(0, 16 * PS)
    m.view()[:] = b"B" * 16 * PS
    conn.send("ready")
    signal.pause()


def test_a_killed_client_loses_its_counts_and_nobody_elses(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("crash", 32 * PS, create=True)
        mine = obj.map(0, 4 * PS)
        mine.view()[:] = b"A" * 4 * PS
        proc, conn = worker(_map_write_and_hang, daemon.socket)
        assert conn.recv() == "ready"
        assert obj.resident_bytes() == 16 * PS  # B overwrote my 4 pages and wrote 12 more
        assert obj.map_count(0) == 2 and obj.map_count(15 * PS) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert wait_for(lambda: obj.map_count(15 * PS) == 0)
        assert obj.map_count(0) == 1
        assert obj.resident_bytes() == 4 * PS  # what A still maps
        assert bytes(mine.view()) == b"B" * 4 * PS  # B's last writes, kept for A
        assert [c["pid"] for c in obj.stats().clients] == [os.getpid()]
        assert client.verify("crash") == []
        mine.close()
        assert obj.resident_bytes() == 0
        obj.close()


def _random_mapper(conn: Connection, path: str, seed: int, npages: int, pause: float = 0.0) -> None:
    rng = random.Random(seed)
    with connect(path) as client, client.open("random") as obj:
        live = []
        for _ in range(60):
            time.sleep(pause * rng.random())
            if live and rng.random() < 0.4:
                m = live.pop(rng.randrange(len(live)))
                if m.length > PS and rng.random() < 0.5:
                    obj.unmap(m.address + PS, PS)  # cut it in two
                m.close()
            else:
                first = rng.randrange(npages)
                n = rng.randint(1, min(8, npages - first))
                live.append(obj.map(first * PS, n * PS, writable=rng.random() < 0.5))
                if live[-1].writable:
                    live[-1].view()[0] = seed
        conn.send("settled")
        conn.recv()


def _naps(port: int) -> float:
    """The daemon's naps so far, from its Prometheus metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    found = re.search(r"^devanon_daemon_naps_total (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


@pytest.mark.parametrize("crowded", [False, True], ids=["idle-cpus", "crowded-cpus"])
def test_verify_agrees_with_proc_maps_after_random_sequences_over_four_processes(
    socket_dir: Path, crowded: bool
) -> None:
    """Crowded: with every CPU wanted, the daemon naps between sparse requests
    (``devanon.broker.crowding``; its metrics show it did), and must still serve them all,
    in order."""
    npages = 64
    pause = 0.002 if crowded else 0.0
    cpus = len(os.sched_getaffinity(0))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = start_daemon(str(socket_dir / "dv.sock"), "--metrics-port", str(port))
    try:
        with busy_cpus(cpus + 1 if crowded else 0), connect(daemon.socket) as client:
            if crowded:  # the premise, from the kernel's run queue
                assert wait_for(lambda: CrowdWatch().crowded(time.monotonic()))
            obj = client.open("random", npages * PS, create=True)
            workers = [
                worker(_random_mapper, daemon.socket, seed, npages, pause) for seed in range(4)
            ]
            for _, conn in workers:
                assert conn.poll(60) and conn.recv() == "settled"
            assert client.verify("random") == []
            kernel = kernel_counts(obj.fd, [proc.pid for proc, _ in workers])
            assert {p: obj.map_count(p * PS) for p in range(npages)} == {
                p: kernel.get(p, 0) for p in range(npages)
            }
            if crowded:
                assert _naps(port) > 0
            for proc, conn in workers:
                conn.send("go")
                proc.join(10)
                assert proc.exitcode == 0
            assert wait_for(lambda: obj.stats().mapped_bytes == 0)
            assert obj.resident_bytes() == 0
            obj.close()
    finally:
        assert daemon.stop() == 0


def _as_nobody(conn: Connection, path: str) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    result: dict[str, Any] = {}
    with connect(path) as client:
        try:
            client.open("public", writable=True)
        except PermissionError as e:
            result["write"] = str(e)
        obj = client.open("public", writable=False)
        m = obj.map(0, PS, writable=False)
        result["read"] = bytes(m.view()[:6])
        try:
            obj.map(0, PS, writable=True)
        except PermissionError as e:
            result["map_writable"] = str(e)
        m.close()
        obj.close()
        result["visible"] = [o["name"] for o in client.stat()]
        try:
            client.open("private", writable=False)
        except PermissionError as e:
            result["private"] = str(e)
        try:
            client.open("private", 8 * PS, writable=False)  # a wrong size: tells nothing
        except PermissionError as e:
            result["private_sized"] = str(e)
        try:
            client.unlink("public")
        except PermissionError as e:
            result["unlink"] = str(e)
            result["unlink_errno"] = e.errno
    conn.send(result)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_another_uid_gets_what_the_mode_allows(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        public = client.open("public", 4 * PS, create=True, mode=0o644)
        private = client.open("private", 4 * PS, create=True, mode=0o600)
        m = public.map(0, PS)
        m.view()[:6] = b"public"
        proc, conn = worker(_as_nobody, daemon.socket)
        result = conn.recv()
        proc.join(10)
        assert "may not write 'public'" in result["write"]
        assert result["read"] == b"public"
        assert "read-only" in result["map_writable"]
        assert result["visible"] == ["public"]
        assert "may not read 'private'" in result["private"]
        assert "owner" not in result["private"] and "0600" not in result["private"]
        assert "may not read 'private'" in result["private_sized"]
        assert str(4 * PS) not in result["private_sized"]
        assert "only the owner" in result["unlink"]
        assert result["unlink_errno"] == errno.EPERM  # as unlink(2) in a sticky directory
        assert public.map_count(0) == 1
        m.close()
        public.close()
        private.close()


_SYSCALLS_X86_64 = {"setgroups": 116, "setresuid": 117, "setresgid": 119}


def _become_in_this_thread_alone(uid: int, gid: int, groups: list[int]) -> None:
    """Change the calling thread's credentials only: the raw system calls (glibc's
    wrappers, and so os.setuid, change every thread's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    for call, args in (
        ("setgroups", (len(groups), array)),
        ("setresgid", (gid, gid, gid)),
        ("setresuid", (uid, uid, uid)),
    ):
        if libc.syscall(_SYSCALLS_X86_64[call], *args) != 0:
            raise OSError(ctypes.get_errno(), call)


def _open_from_threads(conn: Connection, path: str) -> None:
    """The process (its main thread) is in group 0; threads that are not try to read."""
    os.setgroups([0])
    results: dict[str, str] = {}

    def attempt(label: str, groups: list[int]) -> None:
        _become_in_this_thread_alone(65534, 65534, groups)
        with connect(path) as client:
            try:
                client.open("group-only", writable=False).close()
                results[label] = "opened"
            except PermissionError as e:
                results[label] = str(e)

    for label, groups in (("no groups", []), ("group 0", [0])):
        thread = threading.Thread(target=attempt, args=(label, groups))
        thread.start()
        thread.join()
    conn.send(results)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 system call numbers")
def test_the_groups_that_count_are_those_the_client_connected_with(daemon: Served) -> None:
    """The daemon takes a client's groups from its socket (SO_PEERGROUPS), as it takes its
    uid: not from /proc/PID/status, which shows the main thread's (a thread may differ)."""
    with connect(daemon.socket) as client:
        obj = client.open("group-only", PS, create=True, mode=0o640)  # group 0 may read
        proc, conn = worker(_open_from_threads, daemon.socket)
        results = conn.recv()
        proc.join(10)
        assert "may not read 'group-only'" in results["no groups"]
        assert results["group 0"] == "opened"
        obj.close()


def test_names_of_the_longest_lengths_work(daemon: Served) -> None:
    """Any name of up to 255 bytes: the memfd's label, which the kernel caps at 249
    bytes, is cut (at a whole character), the name is not."""
    names = ["n" * wire.MAX_NAME, "é" * 127 + "n"]  # 255 bytes each; é is two
    with connect(daemon.socket) as client:
        for name in names:
            assert len(name.encode()) == wire.MAX_NAME
            obj = client.open(name, 2 * PS, create=True)
            with obj.map(0, PS) as m:
                m.view()[:4] = b"long"
                assert obj.map_count(0) == 1 and client.verify(name) == []
            assert obj.resident_bytes() == 0
            obj.close()
        assert sorted(o["name"] for o in client.stat()) == sorted(names)


def _memfds_held_by(pid: int) -> set[int]:
    """Inodes of the memfds process ``pid`` holds open."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                held.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return held


def test_unlink_while_mapped_keeps_the_memory_until_the_last_user(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("doomed", 4 * PS, create=True)
        m = obj.map(0, 4 * PS)
        m.view()[:4] = b"live"
        client.unlink("doomed")
        assert [o["name"] for o in client.stat()] == []
        with pytest.raises(FileNotFoundError, match="doomed"):
            client.open("doomed")
        assert bytes(m.view()[:4]) == b"live"
        inode = os.fstat(obj.fd).st_ino
        assert inode in _memfds_held_by(daemon.process.pid)
        m.close()
        obj.close()
        # The last user let go: the daemon holds the memfd no more, so the kernel frees it.
        assert wait_for(lambda: inode not in _memfds_held_by(daemon.process.pid))
        again = client.open("doomed", 4 * PS, create=True)
        m2 = again.map(0, 4 * PS)
        assert os.pread(again.fd, 4, 0) == bytes(4)  # a new object, zero-filled
        m2.close()
        again.close()


def test_daemon_restart_gives_clients_a_clear_error_and_no_hang(socket_dir: Path) -> None:
    path = str(socket_dir / "restart.sock")
    served = start_daemon(path)
    client = connect(path)
    obj = client.open("x", 4 * PS, create=True)
    m = obj.map(0, PS)
    assert served.stop() == 0
    with pytest.raises(BrokerError, match="gone"):
        obj.map(0, PS)
    with pytest.raises(BrokerError, match="no devanon daemon"):
        connect(path)
    served = start_daemon(path)
    try:
        with connect(path) as fresh:
            assert fresh.stat() == []
    finally:
        assert served.stop() == 0
    del m


def _maps_of_inodes(inodes: set[int]) -> list[str]:
    """This process's /proc/self/maps lines of files with these inode numbers."""
    with open("/proc/self/maps") as f:
        return [line for line in f if len(parts := line.split()) > 4 and int(parts[4]) in inodes]


def test_after_a_daemon_restart_close_unmaps_everything_and_unpickling_reconnects(
    socket_dir: Path,
) -> None:
    """Closing objects whose daemon is gone unmaps all their mappings (the first unmap the
    daemon could not be told of stopped it, and the rest stayed mapped for good), and
    unpickling in a process that unpickled before uses a new connection, not the dead one."""
    path = str(socket_dir / "again.sock")
    served = start_daemon(path)
    client = connect(path)
    a = client.open("a", 8 * PS, create=True)
    b = client.open("b", 8 * PS, create=True)
    inodes = {os.fstat(a.fd).st_ino, os.fstat(b.fd).st_ino}
    for i in range(4):  # interleaved: no two of one object's mappings touch
        for obj in (a, b):
            obj.map(i * PS, PS).view()[0] = 1
    pickle.loads(pickle.dumps(a)).close()  # this process's shared client: for `path`
    assert len(_maps_of_inodes(inodes)) == 8
    assert served.stop() == 0
    client.close()  # quietly: the daemon dropped the counts when the connection went
    assert a.closed and b.closed
    assert _maps_of_inodes(inodes) == []
    served = start_daemon(path)
    try:
        with connect(path) as fresh:
            made = fresh.open("a", 8 * PS, create=True)
            again = pickle.loads(pickle.dumps(made))
            assert os.fstat(again.fd).st_ino == os.fstat(made.fd).st_ino
            again.close()
            made.close()
    finally:
        assert served.stop() == 0


def test_a_forked_child_of_a_client_that_lost_its_daemon_counts_on_a_new_one(
    socket_dir: Path,
) -> None:
    """The child reconnects (to a daemon started since) and its unmaps are told again: a
    client marked gone stayed so, and the child's pages stayed counted."""
    path = str(socket_dir / "child.sock")
    served = start_daemon(path)
    client = connect(path)
    assert served.stop() == 0
    with pytest.raises(BrokerError, match="gone"):
        client.stat()
    served = start_daemon(path)
    try:

        def child() -> int:
            obj = client.open("again", 4 * PS, create=True)
            obj.map(0, PS).close()
            counted = obj.map_count(0)
            obj.close()
            return 0 if counted == 0 else 3

        assert run_child(child) == 0
        with connect(path) as fresh:
            assert fresh.stat("again")[0]["clients"] == []
    finally:
        assert served.stop() == 0


def test_a_stopping_daemon_punches_nothing_under_live_mappings(socket_dir: Path) -> None:
    path = str(socket_dir / "stop.sock")
    served = start_daemon(path)
    client = connect(path)
    obj = client.open("kept", 8 * PS, create=True)
    m = obj.map(0, 4 * PS)
    m.view()[: 4 * PS] = b"G" * 4 * PS
    assert os.fstat(obj.fd).st_blocks * 512 == 4 * PS
    assert served.stop() == 0
    assert os.fstat(obj.fd).st_blocks * 512 == 4 * PS  # the kernel still holds the data
    assert bytes(m.view()) == b"G" * 4 * PS
    assert kernel_counts(obj.fd, [os.getpid()]) == dict.fromkeys(range(4), 1)
    with pytest.raises(BrokerError, match="gone"):
        obj.map(4 * PS, PS)
    del m


def test_a_stopping_daemon_leaves_another_daemons_socket(socket_dir: Path) -> None:
    path = str(socket_dir / "shared-path.sock")
    first = start_daemon(path)
    try:
        os.unlink(path)  # someone removed the first one's socket file ...
        second = start_daemon(path)  # ... and a second daemon serves there now
        try:
            assert first.stop() == 0
            assert os.path.exists(path)
            with connect(path) as client:
                assert client.stat() == []
        finally:
            assert second.stop() == 0
        assert not os.path.exists(path)  # the second one took its own socket away
    finally:
        first.stop()


class UnreadLog:
    """``devanon serve`` whose log goes to a pipe nobody reads (its room cut to one page)
    until ``stop``: SIGTERM, then everything it wrote, and its exit code."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devanon.cli", "serve", "--socket", path],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        fcntl.fcntl(self.process.stdout.fileno(), fcntl.F_SETPIPE_SZ, PS)
        assert b"listening on" in self.process.stdout.readline()

    def stop(self, unread_for: float = 0.0) -> tuple[str, int]:
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGTERM)
        time.sleep(unread_for)  # the daemon stops while its log is still not read
        out = self.process.stdout.read().decode()  # lets a blocked log writer go on
        return out, self.process.wait(timeout=20)

    def stop_unread(self) -> int:
        """SIGTERM, and the exit code, the log never read."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=daemon_log.FLUSH_TIMEOUT + 10)
        finally:
            self.process.kill()
            self.process.wait()


def test_a_log_nobody_reads_does_not_stop_the_daemon(socket_dir: Path) -> None:
    """The daemon serves on while its log is not read, and every line comes out, as before
    (``devanon serve: `` and the message), once it is read again."""
    daemon = UnreadLog(str(socket_dir / "unread-log.sock"))
    made: list[str] = []
    try:

        def make_many() -> None:
            with connect(daemon.path) as client:
                for i in range(200):  # a line each, ~100 bytes: 20 KiB of log
                    client.open(f"logged-{i:03d}", PS, create=True).close()
                    made.append(f"logged-{i:03d}")

        maker = threading.Thread(target=make_many)
        maker.start()
        maker.join(timeout=30)
        assert not maker.is_alive(), f"the daemon stopped after {len(made)} objects"
    finally:
        out, code = daemon.stop()
    assert len(made) == 200
    assert code == 0 and out.endswith("devanon serve: stopped\n"), out[-500:]
    lines = out.splitlines()
    for i in range(200):
        assert f"devanon serve: client 1 created 'logged-{i:03d}' (4096 bytes, mode 0600)" in lines


def test_a_daemon_whose_log_is_never_read_stops_on_sigterm(socket_dir: Path) -> None:
    """At the end the log's writer gets a few seconds; a log nobody reads cannot keep the
    daemon from exiting (logging's own exit hook used to wait for the blocked writer)."""
    daemon = UnreadLog(str(socket_dir / "never-read.sock"))
    for _ in range(300):  # two lines a connection: more than the pipe holds
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            probe.connect(daemon.path)
    assert daemon.stop_unread() == 0


def test_a_log_backlog_past_its_room_drops_lines_and_the_daemon_still_stops(
    socket_dir: Path,
) -> None:
    """Past the backlog the daemon drops log lines, says how many, and stops cleanly."""
    daemon = UnreadLog(str(socket_dir / "flooded-log.sock"))
    try:
        for _ in range(daemon_log.BACKLOG // 2 + 1000):  # two lines a connection
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                probe.connect(daemon.path)
        with connect(daemon.path) as client:  # served all along
            assert client.stat() == []
    finally:
        out, code = daemon.stop(unread_for=1.0)
    assert code == 0 and out.endswith("devanon serve: stopped\n"), out[-500:]
    dropped = [line for line in out.splitlines() if "log lines dropped" in line]
    assert len(dropped) == 1 and int(dropped[0].split()[2]) > 0, out[-500:]


def test_a_live_daemon_is_not_replaced_and_a_stale_socket_is(socket_dir: Path) -> None:
    path = socket_dir / "one.sock"
    served = start_daemon(str(path))
    try:
        second = subprocess.run(
            [sys.executable, "-m", "devanon.cli", "serve", "--socket", str(path)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert second.returncode == 1 and "already serves" in second.stderr
    finally:
        assert served.stop() == 0
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))  # a socket file nobody listens on
    stale.close()
    served = start_daemon(str(path))
    assert served.stop() == 0


@pytest.mark.parametrize(
    ("flags", "code", "words"),
    [
        (["--socket-mode=-1"], 2, "'-1' is not a mode between 0 and 0777"),
        (["--socket-mode", "999"], 2, "'999' is not an octal mode"),
        (["--socket-group", "no-such-group-here"], 1, "'no-such-group-here': no such group"),
        (["--metrics-port", "70000"], 2, "'70000' is not a port between 0 and 65535"),
        (["--metrics-port", "BUSY"], 1, "--metrics-port"),
        (["--metrics-textfile", "/nonexistent-dir/m.prom"], 1, "/nonexistent-dir/m.prom"),
    ],
)
def test_serve_with_a_bad_flag_says_which_and_leaves_no_socket(
    socket_dir: Path, flags: list[str], code: int, words: str
) -> None:
    path = socket_dir / "bad-flag.sock"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "devanon.cli",
                "serve",
                "--socket",
                str(path),
                *[port if f == "BUSY" else f for f in flags],
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert done.returncode == code and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not path.exists()


def test_serve_never_replaces_a_file_that_is_not_a_socket(socket_dir: Path) -> None:
    path = socket_dir / "not-a-socket"
    path.write_text("precious")
    refused = subprocess.run(
        [sys.executable, "-m", "devanon.cli", "serve", "--socket", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert refused.returncode == 1 and str(path) in refused.stderr
    assert "not a socket" in refused.stderr
    assert path.read_text() == "precious"


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.settimeout(5)
    return sock


def test_bad_wire_input_gets_errors_and_changes_no_count(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("victim", 8 * PS, create=True)
        m = obj.map(0, 4 * PS)
        m.view()[0] = 1
        before = client.stat("victim")
        bad = _raw(daemon.socket)
        handle = wire.OPENED.unpack(  # open the object on the raw connection, properly
            _reply(bad, wire.request(wire.Op.OPEN, 1, wire.OPEN.pack(0, 0, 0) + b"victim"))
        )[0]
        messages = [
            b"",  # nothing at all (a zero-length datagram)
            b"\x02",  # truncated header
            wire.request(wire.Op.MAP, 2, b"\x01"),  # truncated body
            wire.request(wire.Op.MAP, 3, wire.pack_ranges(handle, [(1, PS)])),  # unaligned
            wire.request(wire.Op.MAP, 4, wire.pack_ranges(handle, [(0, 1 << 40)])),  # too long
            wire.request(wire.Op.UNMAP, 5, wire.pack_ranges(handle, [(0, PS)])),  # not mapped
            wire.request(wire.Op.MAP, 6, wire.pack_ranges(99, [(0, PS)])),  # no such handle
            wire.request(wire.Op.OPEN, 7, b"\xff" * 20),  # garbage name
            bytes([77]) + bytes(7),  # unknown op
            wire.request(wire.Op.COUNT, 8, wire.COUNT.pack(handle, 1 << 40)),
        ]
        for message in messages:
            if not message:
                continue  # an empty SEQPACKET datagram reads as EOF: covered by disconnects
            bad.send(message)
            data = bad.recv(wire.MAX_MESSAGE)
            _, status, _ = wire.REPLY.unpack_from(data)
            assert status == wire.STATUS_ERROR, message
        bad.send(b"\0" * (wire.MAX_MESSAGE + 100))  # oversized
        assert wire.REPLY.unpack_from(bad.recv(wire.MAX_MESSAGE))[1] == wire.STATUS_ERROR
        after = client.stat("victim")
        for key in ("mapped_bytes", "resident_bytes", "freed_bytes", "punch_calls"):
            assert after[0][key] == before[0][key], key
        assert obj.map_count(0) == 1 and client.verify("victim") == []
        bad.close()
        m.close()
        obj.close()


def _send(sock: socket.socket, message: bytes, fds: list[int] | None) -> None:
    if fds:
        socket.send_fds(sock, [message], fds)
    else:
        sock.send(message)


def _reply(sock: socket.socket, message: bytes, fds: list[int] | None = None) -> bytes:
    _send(sock, message, fds)
    data, fds, _, _ = socket.recv_fds(sock, wire.MAX_MESSAGE, 4)
    for fd in fds:
        os.close(fd)
    assert wire.REPLY.unpack_from(data)[1] == wire.STATUS_OK, data
    return data[wire.REPLY.size :]


def _status(sock: socket.socket, message: bytes) -> tuple[int, int]:
    """Send; the reply's status and errno (0 on success)."""
    sock.send(message)
    data, fds, _, _ = socket.recv_fds(sock, wire.MAX_MESSAGE, 4)
    for fd in fds:
        os.close(fd)
    status = wire.REPLY.unpack_from(data)[1]
    return status, (wire.ERROR.unpack_from(data, wire.REPLY.size)[0] if status else 0)


@pytest.mark.parametrize("ring", [True, False])
def test_posted_requests_nobody_waits_for_are_forgotten_once_done(
    daemon: Served, ring: bool
) -> None:
    """A posted unmap whose refusal nobody needs to hear of was remembered until a refusal
    came, which for one the daemon took never does: one seq kept for each, for good
    (thousands after a storm of interrupted maps). A later reply says it was done."""
    with Client(daemon.socket, ring=ring) as client:
        obj = client.open("forgotten", 8 * PS, create=True)
        for i in range(5):
            client.map_one(obj._handle, i * PS, PS)
            client.post_unmap(obj._handle, i * PS, PS, wanted=False)
        assert client._unwanted
        client.call(wire.Op.SYNC)
        assert client._unwanted == set()
        assert [obj.map_count(i * PS) for i in range(5)] == [0] * 5
        client.post_unmap(obj._handle, 6 * PS, PS, wanted=False)  # refused: never mapped
        client.call(wire.Op.SYNC)
        assert client._unwanted == set() and client._late_errors == []
        obj.close()


def test_exclusive_is_read_only_with_create(daemon: Served) -> None:
    """As documented (and as O_EXCL): without CREATE the EXCLUSIVE bit is not read."""
    with connect(daemon.socket) as client:
        obj = client.open("ex", PS, create=True)
        raw = _raw(daemon.socket)
        flags = wire.OPEN_WRITABLE | wire.OPEN_EXCLUSIVE
        assert (
            _status(raw, wire.request(wire.Op.OPEN, 1, wire.OPEN.pack(0, 0, flags) + b"ex"))[0]
            == wire.STATUS_OK
        )
        flags |= wire.OPEN_CREATE
        assert _status(
            raw, wire.request(wire.Op.OPEN, 2, wire.OPEN.pack(PS, 0o600, flags) + b"ex")
        ) == (wire.STATUS_ERROR, errno.EEXIST)
        raw.close()
        obj.close()


def test_a_give_back_drops_only_the_refused_map_it_names(daemon: Served) -> None:
    """A seq used again by an accepted MAP, or a give-back of another range, is not
    taken for the refusal: the pages are given back (they stayed counted for good)."""
    with connect(daemon.socket) as client:
        obj = client.open("given", 8 * PS, create=True)
        raw = _raw(daemon.socket)
        opened = _reply(raw, wire.request(wire.Op.OPEN, 1, wire.OPEN.pack(0, 0, 0) + b"given"))
        handle = wire.OPENED.unpack(opened)[0]

        def one(op: wire.Op, seq: int, offset: int, flags: int = 0) -> bytes:
            return wire.request(op, seq, wire.pack_ranges(handle, [(offset, PS)]), flags)

        give_back = wire.FLAG_NOREPLY | wire.FLAG_GIVE_BACK
        assert _status(raw, one(wire.Op.MAP, 7, 64 * PS))[0] == wire.STATUS_ERROR  # refused
        assert _status(raw, one(wire.Op.MAP, 7, 0)) == (wire.STATUS_OK, 0)  # seq 7 again
        raw.send(one(wire.Op.UNMAP, 7, 0, give_back))
        assert _status(raw, wire.request(wire.Op.SYNC, 8)) == (wire.STATUS_OK, 0)
        assert obj.map_count(0) == 0  # given back, not dropped as the refusal's

        assert _status(raw, one(wire.Op.MAP, 9, 64 * PS))[0] == wire.STATUS_ERROR
        assert _status(raw, one(wire.Op.MAP, 10, PS)) == (wire.STATUS_OK, 0)
        raw.send(one(wire.Op.UNMAP, 9, PS, give_back))  # seq 9, another range
        assert _status(raw, wire.request(wire.Op.SYNC, 11)) == (wire.STATUS_OK, 0)
        assert obj.map_count(PS) == 0

        # The refusal it names is dropped, as before.
        assert _status(raw, one(wire.Op.MAP, 12, 2 * PS)) == (wire.STATUS_OK, 0)
        assert _status(raw, one(wire.Op.MAP, 13, 64 * PS))[0] == wire.STATUS_ERROR
        raw.send(one(wire.Op.UNMAP, 13, 64 * PS, give_back))
        assert _status(raw, wire.request(wire.Op.SYNC, 14)) == (wire.STATUS_OK, 0)
        assert obj.map_count(2 * PS) == 1

        # GIVE_BACK anywhere else is refused, and changes nothing; a reply comes.
        for message in (
            one(wire.Op.UNMAP, 15, 2 * PS, wire.FLAG_GIVE_BACK),  # waits for a reply
            one(wire.Op.MAP, 16, 3 * PS, wire.FLAG_GIVE_BACK),
            wire.request(
                wire.Op.UNMAP, 17, wire.pack_ranges(handle, [(2 * PS, PS)] * 2), give_back
            ),
        ):
            assert _status(raw, message) == (wire.STATUS_ERROR, errno.EINVAL), message
        assert [obj.map_count(i * PS) for i in range(4)] == [0, 0, 1, 0]
        raw.close()
        assert wait_for(lambda: obj.map_count(2 * PS) == 0)
        obj.close()


def test_an_open_the_daemon_has_no_descriptor_for_creates_nothing(daemon: Served) -> None:
    """At its descriptor limit, a creating OPEN gets EMFILE and leaves no object behind
    (the object was made and kept, and counted against its owner's quota)."""
    pid = daemon.process.pid
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        with connect(daemon.socket) as client:
            held = len(os.listdir(f"/proc/{pid}/fd"))
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (held + 6, before[1]))
            for i in range(12):
                try:
                    client.open(f"fd-{i}", PS, create=True).close()
                except OSError as e:
                    assert e.errno == errno.EMFILE, e
                    refused = f"fd-{i}"
                    break
            else:
                raise AssertionError("the daemon never ran out of descriptors")
            resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
            assert refused not in {o["name"] for o in client.stat()}
            with pytest.raises(FileNotFoundError):
                client.open(refused)
            client.open(refused, PS, create=True).close()  # room again: made now
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)


def test_a_garbage_sending_client_is_cut_off_and_others_go_on(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("steady", 8 * PS, create=True)
        m = obj.map(0, 8 * PS)
        m.view()[:] = b"s" * 8 * PS
        rng = random.Random(1)
        bad = _raw(daemon.socket)
        cut_off = False
        for _ in range(100):
            try:
                bad.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
                if bad.recv(wire.MAX_MESSAGE) == b"":
                    cut_off = True
                    break
            except (ConnectionResetError, BrokenPipeError):
                cut_off = True
                break
            obj.map_count(0)  # the good client is served all along
        assert cut_off
        again = obj.map(0, PS)
        assert bytes(again.view()) == b"s" * PS
        again.close()
        assert obj.map_count(0) == 1 and client.verify("steady") == []
        m.close()
        obj.close()


def _pickled_worker(conn: Connection, blob: bytes) -> None:
    obj = pickle.loads(blob)
    m = obj.map(0, PS)
    m.view()[:6] = b"worker"
    m.close()
    obj.close()
    conn.send("ok")


def test_a_shared_anon_pickles_by_name_to_a_spawned_worker(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("pickled", 4 * PS, create=True)
        keep = obj.map(0, PS)
        ours, theirs = SPAWN.Pipe()
        proc = SPAWN.Process(target=_pickled_worker, args=(theirs, pickle.dumps(obj)))
        proc.start()
        assert ours.recv() == "ok"
        proc.join(20)
        assert bytes(keep.view()[:6]) == b"worker"
        keep.close()
        obj.close()


def test_a_pickled_shared_anon_is_not_taken_for_a_new_object_of_its_name(
    daemon: Served,
) -> None:
    with connect(daemon.socket) as client:
        old = client.open("renamed", 4 * PS, create=True)
        m = old.map(0, PS)
        m.view()[:3] = b"old"
        blob = pickle.dumps(old)
        client.unlink("renamed")
        new = client.open("renamed", 4 * PS, create=True)
        with pytest.raises(FileNotFoundError, match=r"'renamed' .* not the object that was"):
            pickle.loads(blob)
        again = pickle.loads(pickle.dumps(new))  # the one there now: fine
        assert os.fstat(again.fd).st_ino == os.fstat(new.fd).st_ino
        for each in (again, new):
            each.close()
        m.close()
        old.close()


def _squat(conn: Connection, path: str) -> None:
    """As nobody: make the name someone else is about to create, open to all."""
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    with connect(path) as client:
        client.open("vm0-ram", 4 * PS, create=True, mode=0o666)
        conn.send("made")
        conn.recv()  # held until the test is done


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_an_exclusive_create_never_opens_a_name_someone_made_first(daemon: Served) -> None:
    """create=True opens an existing object (as O_CREAT: root, passing every mode, opened
    a squatter's); exclusive=True refuses it, and the owner is visible either way."""
    proc, conn = worker(_squat, daemon.socket)
    assert conn.recv() == "made"
    try:
        with connect(daemon.socket) as client:
            with pytest.raises(FileExistsError, match="'vm0-ram' exists") as refused:
                client.open("vm0-ram", 4 * PS, create=True, exclusive=True, mode=0o600)
            assert refused.value.errno == errno.EEXIST
            taken = client.open("vm0-ram", 4 * PS, create=True, mode=0o600)
            assert (taken.owner_uid, taken.owner_gid, taken.mode) == (65534, 65534, 0o666)
            taken.close()
            mine = client.open("vm0-mine", 4 * PS, create=True, exclusive=True, mode=0o640)
            assert (mine.owner_uid, mine.mode) == (0, 0o640)
            with pytest.raises(ValueError, match="without create=True"):
                client.open("vm0-mine", exclusive=True)
            with pytest.raises(TypeError, match="bools"):
                client.open("vm0-mine", create=1)  # type: ignore[arg-type]
            mine.close()
            client.unlink("vm0-mine")
    finally:
        conn.send("done")
        proc.join(10)


def test_a_forked_child_does_not_take_a_new_object_of_the_name_for_its_own(
    daemon: Served,
) -> None:
    """The child reopens by name on its own connection: an object made under the name
    since (by anyone) is refused, and nothing is written into it."""
    with connect(daemon.socket) as client:
        old = client.open("job-tmp", 4 * PS, create=True)
        client.unlink("job-tmp")
        new = client.open("job-tmp", 4 * PS, create=True, mode=0o666)

        def child() -> int:
            try:
                old.map(0, PS).view()[:6] = b"secret"
            except FileNotFoundError as e:
                return 3 if "not the object this process inherited" in str(e) else 4
            return 5

        assert run_child(child) == 3
        assert new.resident_bytes() == 0 and new.map_count(0) == 0
        new.close()
        old.close()


def test_forked_children_inherit_only_what_is_registered(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("fork", 8 * PS, create=True)
        kept = obj.map(0, 4 * PS, inherit=True)
        kept.view()[:] = b"k" * 4 * PS
        private = obj.map(4 * PS, 4 * PS)
        private.view()[:] = b"p" * 4 * PS
        r, w = os.pipe()
        go_r, go_w = os.pipe()

        def child() -> int:
            os.close(r)
            os.close(go_w)
            os.read(go_r, 1)  # the parent has unmapped everything by now
            ok = bytes(kept.view()) == b"k" * 4 * PS
            c = obj.map(4 * PS, PS)  # the child's own, on its own connection
            ok = ok and bytes(c.view()) == bytes(PS)  # the parent's pages were punched
            c.close()
            kept.close()
            os.write(w, b"1" if ok else b"0")
            return 0

        pid = start_child(child)
        os.close(w)
        os.close(go_r)
        assert obj.map_count(0) == 2  # ours and the child's pin
        kept.close()
        private.close()
        assert obj.map_count(0) == 1 and obj.map_count(4 * PS) == 0
        assert obj.resident_bytes() == 4 * PS  # the pinned pages stay, the rest went
        os.write(go_w, b"g")
        assert os.read(r, 1) == b"1"
        os.waitpid(pid, 0)
        assert wait_for(lambda: obj.map_count(0) == 0)
        assert obj.resident_bytes() == 0
        obj.close()


def test_verify_counts_a_forked_childs_copy_once_when_the_child_is_a_client(
    daemon: Served,
) -> None:
    """A child that inherited a mapping (pinned for it) and maps the object itself is a
    client: its maps, which verify reads, show the inherited copy, so the pin does not
    count it again (the pin holds for the child's children too: one count for them all)."""
    with connect(daemon.socket) as client:
        obj = client.open("forked", 4 * PS, create=True)
        kept = obj.map(0, PS, inherit=True)
        kept.view()[:1] = b"k"
        ready_r, ready_w = os.pipe()
        done_r, done_w = os.pipe()

        def child() -> int:
            os.close(ready_r)
            os.close(done_w)
            own = obj.map(PS, PS)  # the child's own: it becomes a client
            grandchild = os.fork()  # inherits page 0, and the pipe's write end
            if grandchild == 0:
                os.read(done_r, 1)
                os._exit(0)
            os.write(ready_w, b"r")
            os.read(done_r, 1)
            own.close()
            os.waitpid(grandchild, 0)
            return 0

        pid = start_child(child)
        os.close(ready_w)
        os.close(done_r)
        assert os.read(ready_r, 1) == b"r"
        assert obj.map_count(0) == 2 and obj.map_count(PS) == 1  # ours, and the pin
        assert client.verify("forked") == []
        os.write(done_w, b"dd")
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert wait_for(lambda: obj.map_count(0) == 1) and client.verify("forked") == []
        for fd in (ready_r, done_w):
            os.close(fd)
        kept.close()
        obj.close()


def test_a_fork_whose_pin_is_refused_leaves_the_child_no_copies(
    daemon: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon refuses the PIN (here: ENOMEM, as past its pin limit): the child drops
    its inherited copies (the kernel shows it none), so the parent's unmap, which punches,
    takes nothing from under a live mapping."""
    with connect(daemon.socket) as client:
        obj = client.open("unpinned", 4 * PS, create=True)
        kept = obj.map(0, 4 * PS, inherit=True)
        kept.view()[:] = b"k" * 4 * PS
        call = client.call

        def refuse_pins(op: wire.Op, *args: Any, **kwargs: Any) -> tuple[bytes, list[int]]:
            if op == wire.Op.PIN:
                raise OSError(errno.ENOMEM, "pin refused for the test")
            return call(op, *args, **kwargs)

        monkeypatch.setattr(client, "call", refuse_pins)
        copies = run_child(  # the kernel's view of the child: no mapping of the object
            lambda: int(kernel_counts(obj.fd, [os.getpid()]) != {} or not kept.closed)
        )
        monkeypatch.undo()
        assert copies == 0
        assert obj.map_count(0) == 1  # ours: no pin
        kept.close()
        assert obj.resident_bytes() == 0 and client.verify("unpinned") == []
        obj.close()


def test_a_fork_whose_second_pin_is_refused_lets_the_first_go_at_once(
    daemon: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins go in messages of ``MAX_RANGES`` ranges. When a later one is refused, the
    child (which drops its copies) closes its lifeline at once: what the first message
    pinned goes back while the child lives, not at its exit."""
    n = wire.MAX_RANGES + 5
    with connect(daemon.socket) as client:
        obj = client.open("half-pinned", n * PS, create=True)
        kept = [obj.map(i * PS, PS, inherit=True) for i in range(n)]  # a range each
        for m in kept:
            m.view()[:1] = b"x"
        call, pins = client.call, [0]

        def refuse_the_second_pin(
            op: wire.Op, *args: Any, **kwargs: Any
        ) -> tuple[bytes, list[int]]:
            if op == wire.Op.PIN:
                pins[0] += 1
                if pins[0] == 2:
                    raise OSError(errno.ENOMEM, "pin refused for the test")
            return call(op, *args, **kwargs)

        monkeypatch.setattr(client, "call", refuse_the_second_pin)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)  # alive until the parent has looked
            os._exit(0 if all(m.closed for m in kept) else 1)
        monkeypatch.undo()
        os.close(r)
        try:
            assert pins[0] == 2
            for m in kept:
                m.close()
            assert wait_for(lambda: obj.resident_bytes() == 0)  # the child still lives
            assert obj.map_count(0) == 0
        finally:
            os.close(w)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        obj.close()


def test_the_daemon_holds_as_many_descriptors_as_it_may(daemon: Served) -> None:
    """The per-user caps (~7,000 descriptors a uid) of a few users passed the hard limit
    the daemon was started with: it raises its soft limit to the hard one, and with
    CAP_SYS_RESOURCE (root, unless a container took it) the hard one to fs.nr_open."""
    status = Path("/proc/self/status").read_text()
    (caps,) = [
        int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapEff")
    ]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the daemon's, when it started
    if caps & (1 << 24):  # CAP_SYS_RESOURCE
        hard = max(hard, int(Path("/proc/sys/fs/nr_open").read_text()))
    limits = Path(f"/proc/{daemon.process.pid}/limits").read_text()
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)]


def test_stat_shows_names_without_markup_or_escape_sequences(daemon: Served) -> None:
    """Anyone may name an object: the table shows its name as text (rich markup read in
    it hid part of it; an escape sequence went to the terminal as it was)."""
    names = ["zz\x1b[31mRED\x1b[0m", "zz[reverse]ADMIN", "café-日本"]
    with connect(daemon.socket) as client:
        objs = [client.open(name, PS, create=True) for name in names]
        out = subprocess.run(
            [sys.executable, "-m", "devanon.cli", "stat", "--socket", daemon.socket],
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "COLUMNS": "300"},
        )
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout
        assert "zz\\x1b[31mRED\\x1b[0m" in out.stdout
        assert "zz[reverse]ADMIN" in out.stdout and "café-日本" in out.stdout
        for obj in objs:
            obj.close()


def test_stat_cli_and_metrics_textfile(socket_dir: Path) -> None:
    path = str(socket_dir / "m.sock")
    textfile = socket_dir / "devanon.prom"
    served = start_daemon(path, "--metrics-textfile", str(textfile))
    try:
        with connect(path) as client:
            obj = client.open("metered", 4 * PS, create=True)
            inode = os.fstat(obj.fd).st_ino
            m = obj.map(0, 2 * PS)
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "devanon.cli",
                    "stat",
                    "--socket",
                    path,
                    "--json",
                    "--verify",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert out.returncode == 0, out.stderr
            (info,) = json.loads(out.stdout)
            assert info["mapped_bytes"] == 2 * PS and info["differences"] == []
            assert wait_for(
                lambda: "metered" in textfile.read_text() if textfile.exists() else False,
                timeout=15,
            )
            m.close()
            obj.close()
            text = textfile.read_text()
    finally:
        assert served.stop() == 0
    assert not textfile.exists()  # a stopped daemon leaves no figures that look live
    (labels,) = re.findall(r"^devanon_object_size_bytes\{(.*)\} ", text, re.M)
    assert sorted(labels.split(",")) == [f'inode="{inode}"', 'name="metered"']
    assert re.search(r"^devanon_daemon_crowded [01]\.0$", text, re.M)
    assert re.search(r"^devanon_daemon_naps_total \d+\.0$", text, re.M)


def test_client_side_bad_input(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        with pytest.raises(FileNotFoundError, match="nothing"):
            client.open("nothing")
        with pytest.raises(ValueError, match="no '/'"):
            client.open("a/b", PS, create=True)
        with pytest.raises(TypeError):
            client.open(b"bytes", PS, create=True)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="size"):
            client.open("odd", 100, create=True)
        obj = client.open("ok", 4 * PS, create=True)
        with pytest.raises(ValueError, match="exists with size"):
            client.open("ok", 8 * PS)
        with pytest.raises(ValueError, match="past the end"):
            obj.map(0, 8 * PS)
        assert client.stat("ok")[0]["mapped_bytes"] == 0
        for bad, exc, text in [
            (-PS, ValueError, hex(-PS)),
            (4 * PS, ValueError, hex(4 * PS)),
            (1.0, TypeError, "1.0"),
            (True, TypeError, "True"),
        ]:
            with pytest.raises(exc, match=re.escape(text)):
                obj.map_count(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=str(1 << 70)):
            client.open("typed", 1 << 70, create=True)
        with pytest.raises(TypeError, match="True"):
            client.open("typed", PS, create=True, mode=True)
        with pytest.raises(TypeError, match="'big'"):
            client.open("typed", "big", create=True)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"0\.5"):
            client.open("typed", PS, create=True, mode=0.5)  # type: ignore[arg-type]
        assert client.stat("ok")[0]["mapped_bytes"] == 0 and obj.map_count(0) == 0
        obj.close()
        with pytest.raises(ValueError, match="closed"):
            obj.map(0, PS)


def test_numpy_integers_are_taken_as_ints_by_shared_objects(daemon: Served) -> None:
    """Sizes, modes and offsets computed with NumPy work as ints (``__index__``), as for
    ``Anon``; the counts are the kernel's."""
    np = pytest.importorskip("numpy")
    with connect(daemon.socket) as client:
        obj = client.open("np", np.int64(4 * PS), create=True, mode=np.int32(0o600))
        m = obj.map(np.int64(PS), np.uint32(2 * PS))
        assert obj.mode == 0o600 and obj.size == 4 * PS
        assert [obj.map_count(np.int64(p * PS)) for p in range(4)] == [0, 1, 1, 0]
        assert client.verify("np") == []
        m.close()
        obj.close()
        client.unlink("np")


def test_socket_mode_and_errno_of_refusals(daemon: Served) -> None:
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o666
    raw = _raw(daemon.socket)
    raw.send(wire.request(wire.Op.OPEN, 1, wire.OPEN.pack(0, 0, 0) + b"missing"))
    data = raw.recv(wire.MAX_MESSAGE)
    (code,) = struct.unpack_from("<i", data, wire.REPLY.size)
    assert code == errno.ENOENT
    raw.close()


def _connect_as_nobody(conn: Connection, path: str) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    try:
        connect(path)
    except BrokerError as e:
        conn.send(str(e))
    else:
        conn.send("connected")


def test_default_socket_mode_is_the_owners_alone(socket_dir: Path) -> None:
    served = start_daemon(str(socket_dir / "own.sock"))
    try:
        assert os.stat(socket_dir / "own.sock").st_mode & 0o777 == 0o600
        if os.geteuid() == 0:
            proc, conn = worker(_connect_as_nobody, served.socket)
            said = conn.recv()
            proc.join(10)
            assert "may not connect" in said and "--socket-mode" in said, said
    finally:
        assert served.stop() == 0


def test_a_client_with_its_own_connection_per_thread_is_not_needed(daemon: Served) -> None:

    with connect(daemon.socket) as client:
        obj = client.open("threads", 64 * PS, create=True)
        errors: list[BaseException] = []

        def run(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(100):
                    first = rng.randrange(60)
                    obj.map(first * PS, 4 * PS).close()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert client.stat("threads")[0]["mapped_bytes"] == 0
        assert isinstance(client, Client)
        obj.close()


def _reopen_for_writing(conn: Connection, path: str) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    with connect(path) as client:
        ro = client.open("guarded", writable=False)
        try:
            os.open(f"/proc/self/fd/{ro.fd}", os.O_RDWR)
        except PermissionError:
            conn.send("refused")
        else:
            conn.send("reopened for writing")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_a_read_only_descriptor_cannot_be_reopened_for_writing(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("guarded", PS, create=True, mode=0o644)
        proc, conn = worker(_reopen_for_writing, daemon.socket)
        assert conn.recv() == "refused"  # the memfd's inode is 0600, not memfd's usual 0777
        proc.join(10)
        obj.close()


def test_a_pin_whose_lifeline_is_no_pipe_is_refused_and_pins_nothing(
    daemon: Served, tmp_path: Path
) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("pinned", 4 * PS, create=True)
        m = obj.map(0, PS)
        m.view()[0] = 1
        regular = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
        with pytest.raises(OSError, match="pipe"):
            client.call(wire.Op.PIN, wire.pack_ranges(obj._handle, [(0, PS)]), [regular])
        os.close(regular)
        assert obj.map_count(0) == 1 and client.stat("pinned")[0]["pinned_children"] == 0
        m.close()
        assert obj.resident_bytes() == 0
        obj.close()


def test_a_pin_whose_lifeline_would_never_read_eof_is_refused_and_pins_nothing(
    daemon: Served, tmp_path: Path
) -> None:
    """A lifeline the daemon could write to never reads EOF (the daemon itself holds a
    writer): a pipe's write end, or its read end reopened read-write, would pin forever.
    So would a named FIFO that no writer ever opened (it never polls readable)."""
    with connect(daemon.socket) as client:
        obj = client.open("pinned", 4 * PS, create=True)
        m = obj.map(0, PS)
        m.view()[0] = 1
        read_end, write_end = os.pipe()
        both = os.open(f"/proc/self/fd/{read_end}", os.O_RDWR)  # the same pipe, read-write
        os.mkfifo(tmp_path / "fifo")
        fifo = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        for lifeline, why in ((write_end, "read-only"), (both, "read-only"), (fifo, "FIFO")):
            with pytest.raises(OSError, match=why) as refused:
                client.call(wire.Op.PIN, wire.pack_ranges(obj._handle, [(0, PS)]), [lifeline])
            assert refused.value.errno == errno.EPROTO
        for fd in (read_end, write_end, both, fifo):
            os.close(fd)
        assert obj.map_count(0) == 1 and client.stat("pinned")[0]["pinned_children"] == 0
        m.close()
        assert obj.resident_bytes() == 0
        obj.close()


def _lingering_tcp_socket() -> tuple[socket.socket, socket.socket]:
    """A TCP connection whose sending end has unsent data and SO_LINGER of 60 s: closing its
    last descriptor waits until the data is read, the receiver gives up, or 60 s pass.
    Returns (sender, receiver); the receiver never reads."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    listener.close()
    sender.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sender.send(b"x" * 65536)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 60))
    return sender, receiver


@pytest.mark.parametrize("how", ["itself", "queued in a unix socket", "one too many", "cut off"])
def test_a_descriptor_that_blocks_on_close_does_not_stop_the_daemon(
    daemon: Served, how: str
) -> None:
    """A client sends a socket whose close waits out its linger (60 s), and closes its own
    copy: the daemon refuses the request (only PIN carries a descriptor) and serves
    everyone meanwhile. Its one thread sat in that close (the socket itself; an AF_UNIX
    socket carrying it in an unread message; the fifth of a message, which the kernel
    closed as it found no room; a message still queued when the client was cut off,
    freed by the close of its socket)."""
    sender, receiver = _lingering_tcp_socket()
    carrier, holder = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    socket.send_fds(carrier, [b"x"], [sender.fileno()])  # in holder's queue now
    r, w = os.pipe()
    sent = {
        "itself": [sender.fileno()],
        "queued in a unix socket": [holder.fileno()],
        "one too many": [r] * wire.MAX_FDS + [sender.fileno()],
        "cut off": [sender.fileno()],
    }[how]
    with connect(daemon.socket) as other:
        obj = other.open("served", PS, create=True)
        started = time.monotonic()
        raw = _raw(daemon.socket)
        if how == "cut off":  # its queue holds the socket when it is cut off
            for _ in range(40):
                raw.send(bytes([77]) + bytes(7))  # unknown ops: cut off after 16
        socket.send_fds(raw, [wire.request(wire.Op.SYNC, 99)], sent)
        for each in (sender, carrier, holder):
            each.close()  # in flight: the daemon's copy is the last, and its close lingers
        if how != "cut off":
            _, status, seq = wire.REPLY.unpack_from(raw.recv(wire.MAX_MESSAGE))
            assert (status, seq) == (wire.STATUS_ERROR, 99)
        for _ in range(3):
            obj.map(0, PS).close()
            other.stat()
        assert time.monotonic() - started < 10  # not the 60 s linger
        raw.close()
        obj.close()
    receiver.close()  # the linger ends
    os.close(r)
    os.close(w)


def test_a_descriptor_sent_by_mistake_is_not_changed(daemon: Served) -> None:
    """The daemon refuses it and lets go of its copy; the client's (the same socket) keeps
    its options (an abortive-close linger set on it cut the client's own stream short)."""
    listener = socket.create_server(("127.0.0.1", 0))
    mine = socket.create_connection(listener.getsockname())
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 30))
    with connect(daemon.socket) as client:
        with pytest.raises(OSError, match="only PIN"):
            client.call(wire.Op.SYNC, b"", [mine.fileno()])
        client.call(wire.Op.SYNC)
    assert struct.unpack("ii", mine.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 30)
    for each in (mine, listener):
        each.close()


def _create_shut_out(conn: Connection, path: str) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)  # root passes any mode, as on a file system: be somebody else
    with connect(path) as client:
        try:
            client.open("ghost", PS, create=True, mode=0o200)
        except PermissionError as e:
            conn.send(str(e))
        else:
            conn.send("created")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_a_mode_that_shuts_out_its_creator_creates_nothing(daemon: Served) -> None:
    proc, conn = worker(_create_shut_out, daemon.socket)
    assert "would not let its creator" in conn.recv()
    proc.join(10)
    with connect(daemon.socket) as client:
        assert client.stat() == []


def _two_connections(conn: Connection, path: str) -> None:
    first, second = connect(path), connect(path)
    a = first.open("twice").map(0, PS)
    b = second.open("twice").map(PS, PS)
    conn.send(first.verify("twice"))
    conn.recv()
    del a, b


def test_verify_reads_each_process_once_however_many_connections(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("twice", 4 * PS, create=True)
        proc, conn = worker(_two_connections, daemon.socket)
        assert conn.recv() == []
        assert client.verify("twice") == []
        conn.send("done")
        proc.join(10)
        obj.close()


def test_verify_sees_a_client_that_maps_without_telling_the_daemon(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("untold", 4 * PS, create=True)
        behind = mmap.mmap(obj.fd, 2 * PS, offset=PS)  # no MAP request: no count
        try:
            assert obj.map_count(PS) == 0
            assert client.verify("untold") == [
                {"first_page": 1, "stop_page": 3, "daemon_count": 0, "kernel_count": 1}
            ]
        finally:
            behind.close()
        assert client.verify("untold") == []
        obj.close()


def _view_of_a_forgotten_mapping(path: str, name: str) -> memoryview:
    """A client of its own, an object, a mapping written to: all dropped, but the view."""
    c = connect(path)
    m = c.open(name).map(0, 4 * PS)
    view = m.view()
    view[:5] = b"hello"
    return view


def test_a_shared_anon_dropped_with_its_client_gives_its_mappings_back(
    daemon: Served,
) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("dropped", 16 * PS, create=True)
        view = _view_of_a_forgotten_mapping(daemon.socket, "dropped")
        gc.collect()  # the mapping, its SharedAnon and their Client form a cycle
        obj.flush()
        assert kernel_counts(obj.fd, [os.getpid()]) == {}  # unmapped, not left behind
        assert client.verify("dropped") == []
        assert obj.resident_bytes() == 0
        assert bytes(view[:5]) == bytes(5)  # the stale view reads zeros
        del view
        obj.close()


def test_closing_a_client_closes_what_it_opened(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("closed-with", 4 * PS, create=True)
        with connect(daemon.socket) as other:
            shared = other.open("closed-with")
            m = shared.map(0, 2 * PS)
            m.view()[:4] = b"data"
        assert shared.closed and m.closed
        assert kernel_counts(obj.fd, [os.getpid()]) == {}
        assert client.verify("closed-with") == []
        obj.close()


def test_an_overlay_of_another_devanon_objects_file_is_refused(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        a = client.open("overlaid-a", 4 * PS, create=True)
        b = client.open("overlaid-b", 4 * PS, create=True)
        ma, mb = a.map(0, PS), b.map(0, PS)
        ma.view()[:4] = b"AAAA"
        with pytest.raises(ValueError, match=r"the file of <devanon\.SharedAnon 'overlaid-a'"):
            b.overlay(mb.address, a.fd, 0, PS)  # uncounted by a: punched under it
        assert client.verify("overlaid-a") == [] and client.verify("overlaid-b") == []
        for each in (ma, mb, a, b):
            each.close()


def test_a_forked_child_closes_its_copy_cleanly(daemon: Served) -> None:
    with connect(daemon.socket) as client:
        obj = client.open("copied", 4 * PS, create=True)
        m = obj.map(0, PS)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                obj.close()  # the parent's handle is not the child's to close
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert obj.map_count(0) == 1
        m.close()
        obj.close()


def test_a_map_the_daemon_refuses_leaves_no_mapping(daemon: Served) -> None:
    """The client mmaps while its MAP request is on the way; a refusal must undo that."""
    with connect(daemon.socket) as client:
        obj = client.open("refused-map", 4 * PS, create=True)
        kept = obj.map(0, PS)
        good_handle, obj._handle = obj._handle, 999_999  # a handle the daemon never gave
        try:
            with pytest.raises(ValueError, match="no open handle 999999"):
                obj.map(PS, PS)
        finally:
            obj._handle = good_handle
        assert kernel_counts(obj.fd, [os.getpid()]) == {0: 1}  # page 1 is mapped nowhere
        assert len(obj._segments) == 1  # and nothing of it in the books
        assert client.stat("refused-map")[0]["mapped_bytes"] == PS
        again = obj.map(PS, PS)  # the connection is still in step: the next map works
        assert kernel_counts(obj.fd, [os.getpid()]) == {0: 1, 1: 1}
        again.close()
        kept.close()
        assert obj.resident_bytes() == 0
        obj.close()


def test_a_client_cannot_make_the_daemons_memory_its_own(daemon: Served) -> None:
    """MAP requests that count far more separate ranges than a process can map (the kernel
    stops at vm.max_map_count) are refused with ENOMEM; the daemon and others go on."""
    from devanon.broker import objects

    stride = 32 * PS  # 128 ranges a chunk: they stay runs, two each
    size = stride * (objects.MAX_CLIENT_RUNS // 2 + 4096)
    with connect(daemon.socket) as greedy, connect(daemon.socket) as other:
        obj = greedy.open("greedy", size, create=True)
        per_message = 4000
        granted = 0
        with pytest.raises(OSError) as refused:
            while granted < objects.MAX_CLIENT_RUNS:  # never reached: refused first
                ranges = [((granted + i) * stride, PS) for i in range(per_message)]
                greedy.call(wire.Op.MAP, wire.pack_ranges(obj._handle, ranges))
                granted += per_message
        assert refused.value.errno == errno.ENOMEM
        assert "unmap first" in str(refused.value)
        assert granted * 2 <= objects.MAX_CLIENT_RUNS
        (info,) = greedy.stat("greedy")
        assert info["mapped_bytes"] == granted * PS  # the refused request counted nothing
        mine = other.open("other", 4 * PS, create=True)
        with mine.map(0, PS):
            assert mine.map_count(0) == 1
        mine.close()
        obj.close()  # its last handle: every count it held goes
        (info,) = other.stat("greedy")
        assert info["mapped_bytes"] == 0 and info["count_runs"] == 1


def test_unmaps_that_split_runs_cannot_make_the_daemons_memory_their_own(daemon: Served) -> None:
    """One MAP of everything, then one-page UNMAPs in its middle: each splits a run in
    three. Past the client's cap they are refused (ENOMEM, naming the object and the cap)
    as MAPs are, and change nothing; an unmap that splits nothing still goes through."""
    from devanon.broker import objects
    from devanon.counts import DENSE_CHUNK

    per_chunk = 120  # holes a chunk: its runs stay runs (a chunk turns dense past 256)
    chunks = (objects.MAX_CLIENT_RUNS // 2 + 2 * wire.MAX_RANGES) // per_chunk
    holes = [(c * DENSE_CHUNK + 2 * j + 1) * PS for c in range(chunks) for j in range(per_chunk)]
    with connect(daemon.socket) as client, connect(daemon.socket) as other:
        obj = client.open("holes", chunks * DENSE_CHUNK * PS, create=True)
        client.call(wire.Op.MAP, wire.pack_ranges(obj._handle, [(0, obj.size)]))
        held = other.open("holes")  # all of it too: no hole falls to 0 (nothing to punch)
        other.call(wire.Op.MAP, wire.pack_ranges(held._handle, [(0, obj.size)]))
        done = 0
        with pytest.raises(OSError) as refused:
            while done < len(holes):  # never reached: refused first
                batch = holes[done : done + wire.MAX_RANGES]
                client.call(wire.Op.UNMAP, wire.pack_ranges(obj._handle, [(h, PS) for h in batch]))
                done += len(batch)
        assert refused.value.errno == errno.ENOMEM
        assert "'holes'" in str(refused.value)
        assert str(objects.MAX_CLIENT_RUNS) in str(refused.value)
        assert obj.map_count(holes[done - 1]) == 1 and obj.map_count(holes[done]) == 2  # undone
        with pytest.raises(OSError) as one:  # one range at a time (the hot path): to the cap
            for hole in holes[done:]:
                client.call(wire.Op.UNMAP, wire.pack_ranges(obj._handle, [(hole, PS)]))
                done += 1
        assert one.value.errno == errno.ENOMEM and "'holes'" in str(one.value)
        (info,) = client.stat("holes")
        assert objects.MAX_CLIENT_RUNS - 2 < info["count_runs"] <= objects.MAX_CLIENT_RUNS
        assert obj.map_count(holes[done - 1]) == 1 and obj.map_count(holes[done]) == 2
        client.call(wire.Op.UNMAP, wire.pack_ranges(obj._handle, [(0, holes[0])]))  # merges
        assert obj.map_count(0) == 1
        obj.close()  # its last handle: every count it held goes
        (info,) = client.stat("holes")
        assert info["mapped_bytes"] == obj.size and info["count_runs"] == 1  # the other's
        held.close()


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_an_interrupted_map_leaves_the_counts_and_the_connection_right(
    daemon: Served, monkeypatch: pytest.MonkeyPatch, ring: bool
) -> None:
    """Ctrl-C while a MAP's reply is awaited (in the ring or on the socket): no mapping, no
    count, the lock free; and Ctrl-C just after the mmap: the count stays with the (lost)
    mapping, so the page under it is never punched."""

    with Client(daemon.socket, ring=ring) as client:
        obj = client.open("interrupted", 4 * PS, create=True)
        obj.map(0, PS).close()  # the ring, if any, is set up
        assert (client._ring is not None) == ring
        interrupt_once(monkeypatch, client, "_ring_reply_to" if ring else "_receive")
        with pytest.raises(KeyboardInterrupt):
            obj.map(0, PS)
        assert not client._lock._is_owned()  # type: ignore[attr-defined]
        obj.flush()  # no late error: the give-back UNMAP's answer is nobody's
        assert kernel_counts(obj.fd, [os.getpid()]) == {}
        assert client.verify("interrupted") == []

        keep = obj.map(0, PS)
        keep.view()[:5] = b"hello"
        interrupt_after_next_mmap(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            obj.map(0, PS)
        keep.close()
        obj.flush()
        assert client.verify("interrupted") == []  # the lost mapping is still counted
        assert obj.resident_bytes() == PS  # so "hello" was not punched under it
        unmap_every_mapping_of(os.fstat(obj.fd))  # the lost mapping: tidy up
        obj.close()


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_the_give_back_of_an_interrupted_map_the_daemon_refused_takes_nothing(
    daemon: Served, monkeypatch: pytest.MonkeyPatch, ring: bool
) -> None:
    """Ctrl-C while the answer to a MAP of a page the client maps already is awaited: the
    client gives the MAP back. The daemon refused that MAP (the client's counts are at
    their cap): the give-back must not take the other mapping's count (and punch it)."""
    from devanon.broker import objects

    stride = 32 * PS  # 128 ranges a chunk: they stay runs, two each
    size = stride * (objects.MAX_CLIENT_RUNS // 2 + 4096)
    with Client(daemon.socket, ring=ring) as client:
        obj = client.open("refused-then-given-back", size, create=True)
        keep = obj.map(0, PS)
        keep.view()[:5] = b"hello"
        assert (client._ring is not None) == ring
        granted = 1
        for batch in (4000, 400, 40, 4, 1):  # up to the cap, without mmaps
            with pytest.raises(OSError, match="unmap first"):
                while True:
                    ranges = [((granted + i) * stride, PS) for i in range(batch)]
                    client.call(wire.Op.MAP, wire.pack_ranges(obj._handle, ranges))
                    granted += batch
        interrupt_once(monkeypatch, client, "_ring_reply_to" if ring else "_receive")
        with pytest.raises(KeyboardInterrupt):
            obj.map(0, PS)  # refused (ENOMEM), but we stopped waiting before we knew
        obj.flush()  # no late error: the refusal and the give-back are nobody's
        assert obj.map_count(0) == 1  # still keep's
        assert bytes(keep.view()[:5]) == b"hello" and 0 in data_pages(obj.fd, PS, PS)
        keep.close()
        obj.close()


@pytest.mark.parametrize("sent", [True, False], ids=["sent", "not-sent"])
def test_a_map_interrupted_as_it_goes_on_the_socket_leaves_no_count(
    daemon: Served, monkeypatch: pytest.MonkeyPatch, sent: bool
) -> None:
    """Ctrl-C as a MAP goes on the socket: the client cannot tell whether it went out. If
    it did, the daemon's yes, when it comes, is given back; if not, nothing is (a later
    MAP of the same page keeps its count)."""
    with Client(daemon.socket, ring=False) as client:
        obj = client.open("sent-or-not", 4 * PS, create=True)
        interrupt_once(monkeypatch, client, "_transmit", after_call=sent)
        with pytest.raises(KeyboardInterrupt):
            obj.map(0, PS)
        assert not client._lock._is_owned()  # type: ignore[attr-defined]
        assert wait_for(lambda: obj.map_count(0) == 0)
        assert client._give_back == {}  # answered, or passed by a later reply
        keep = obj.map(0, PS)
        obj.flush()
        assert obj.map_count(0) == 1 and client.verify("sent-or-not") == []
        assert kernel_counts(obj.fd, [os.getpid()]) == {0: 1}
        keep.close()
        obj.close()


def _maps_under_a_signal_storm(conn: Connection, path: str, ring: bool, seconds: float) -> None:
    """Map and unmap page 0 in a loop while an interval timer's handler maps and unmaps
    page 1 (a signal handler may use the client anywhere in the middle of a call)."""
    import time

    client = Client(path, ring=ring)
    obj = client.open("storm", 4 * PS, create=True)
    obj.map(0, PS).close()
    counts = [0, 0]
    inside = [False]

    def handler(*_: object) -> None:
        if inside[0]:  # the timer fired again inside the handler: skip (no recursion)
            return
        inside[0] = True
        try:
            obj.map(PS, PS).close()
            counts[1] += 1
        finally:
            inside[0] = False

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0007, 0.0007)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        obj.map(0, PS).close()
        counts[0] += 1
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    obj.flush()
    conn.send((counts, client.verify("storm"), kernel_counts(obj.fd, [os.getpid()])))
    obj.close()
    client.close()


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
def test_maps_made_by_a_signal_handler_mid_call_lose_nothing(daemon: Served, ring: bool) -> None:
    """Nested calls at every point of a map or unmap (an interval timer of 0.7 ms): no
    request lost or served out of turn, no reply taken by the wrong waiter, no hang."""
    proc, conn = worker(_maps_under_a_signal_storm, daemon.socket, ring, 4.0)
    try:
        assert conn.poll(60), "a map lost its reply, or a request was lost: the loop hung"
        (made, nested), verify, kernel = conn.recv()
    finally:
        proc.kill()
        proc.join(10)
    assert made > 100 and nested > 100, (made, nested)
    assert verify == [] and kernel == {}


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "socket"])
@pytest.mark.parametrize("nested", ["stat", "map"])
def test_a_call_made_while_a_map_waits_does_not_steal_its_reply(
    daemon: Served, monkeypatch: pytest.MonkeyPatch, ring: bool, nested: str
) -> None:
    """A signal handler may use the client in the middle of a map (the lock is reentrant):
    each waiter gets its own reply, through the ring or the socket."""
    from devanon import _libc

    with Client(daemon.socket, ring=ring) as client:
        obj = client.open("reentrant", 4 * PS, create=True)
        obj.map(0, PS).close()  # the ring, if any, is set up
        real_mmap = _libc.mmap
        seen: list[int] = []
        inner: list[Any] = []

        def mmap_and_stat(*args: int) -> int:
            monkeypatch.setattr(_libc, "mmap", real_mmap)
            address = real_mmap(*args)
            if nested == "map":
                inner.append(obj.map(PS, PS))  # a MAP of its own while ours waits
            seen.append(client.stat("reentrant")[0]["mapped_bytes"])
            return address

        monkeypatch.setattr(_libc, "mmap", mmap_and_stat)
        made: list[Any] = []
        mapper = threading.Thread(target=lambda: made.append(obj.map(0, PS)), daemon=True)
        mapper.start()
        mapper.join(10)
        assert not mapper.is_alive(), "the map waits for a reply somebody else took"
        # the outer MAP was counted before the stat's answer (and the inner one too)
        assert seen == [PS * (2 if nested == "map" else 1)]
        assert kernel_counts(obj.fd, [os.getpid()]) == ({0: 1, 1: 1} if inner else {0: 1})
        for m in inner:
            m.close()
        made[0].close()
        obj.flush()
        assert client._late_errors == []
        obj.close()


def _create_until_refused(conn: Connection, path: str) -> None:
    """As nobody: create objects until the daemon refuses one; then unlink one and retry."""
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    made, refused = 0, None
    with connect(path) as client:
        while refused is None and made <= 2000:
            try:
                body, fds = client.call(
                    wire.Op.OPEN, wire.OPEN.pack(PS, 0o600, wire.OPEN_CREATE) + f"q{made}".encode()
                )
            except OSError as e:
                refused = (e.errno, str(e))
            else:
                for fd in fds:
                    os.close(fd)
                (handle,) = struct.unpack_from("<I", body)
                client.call(wire.Op.CLOSE, wire.HANDLE.pack(handle))
                made += 1
        client.unlink("q0")
        _, fds = client.call(wire.Op.OPEN, wire.OPEN.pack(PS, 0o600, wire.OPEN_CREATE) + b"again")
        for fd in fds:
            os.close(fd)
        for i in range(1, made):
            client.unlink(f"q{i}")
        client.unlink("again")
    conn.send((made, refused))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_one_user_cannot_use_up_the_daemon(daemon: Served) -> None:
    from devanon.broker import server

    proc, conn = worker(_create_until_refused, daemon.socket)
    assert conn.poll(60)
    made, refused = conn.recv()
    proc.join(10)
    assert made == server.MAX_OBJECTS_PER_UID
    assert refused is not None and refused[0] == errno.EDQUOT
    assert "uid 65534 owns 1024 objects already (0 of them unlinked" in refused[1]
    with connect(daemon.socket) as client:  # root is not held, and nothing was left behind
        assert client.stat() == []
        client.open("root-still-can", PS, create=True).close()


def _connect_and_pin_until_refused(conn: Connection, path: str) -> None:
    """As nobody: open connections until the daemon turns one away, then pin one object
    until a PIN is refused; say how many of each went through."""
    import resource

    from devanon.broker import server

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # room for the connections
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    held: list[socket.socket] = []
    for _ in range(server.MAX_CONNECTIONS_PER_UID + 1):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        held.append(sock)
    answered = 0
    for sock in held:  # all held open: the daemon accepts in order, the last is turned away
        sock.settimeout(10)
        try:
            _send(sock, wire.request(wire.Op.SYNC, 1), [])
            answered += bool(sock.recv(wire.MAX_MESSAGE))
        except (BrokenPipeError, ConnectionResetError):
            pass
    for sock in held:
        sock.close()
    pins, refused = 0, None
    with connect(path) as client:
        obj = client.open("pinned-by-nobody", PS, create=True)
        r, w = os.pipe()
        body = wire.pack_ranges(obj._handle, [(0, PS)])
        while refused is None and pins <= server.MAX_PINS_PER_UID:
            try:
                client.call(wire.Op.PIN, body, fds=[r])
            except OSError as e:
                refused = (e.errno, str(e))
            else:
                pins += 1
        os.close(w)  # every pin's lifeline reads EOF: they all go
        obj.close()
        client.unlink("pinned-by-nobody")
    conn.send((answered, pins, refused))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")
def test_one_user_cannot_take_the_daemons_descriptors(daemon: Served) -> None:
    from devanon.broker import server

    proc, conn = worker(_connect_and_pin_until_refused, daemon.socket)
    assert conn.poll(120)
    connections, pins, refused = conn.recv()
    proc.join(10)
    assert connections == server.MAX_CONNECTIONS_PER_UID
    assert pins == server.MAX_PINS_PER_UID
    assert refused is not None and refused[0] == errno.EDQUOT and "4096 pins" in refused[1]
    with connect(daemon.socket) as client:  # root is not held, and the pins went
        assert wait_for(lambda: client.stat() == [])
        obj = client.open("root-still-can", PS, create=True)
        obj.map(0, PS).close()
        obj.close()
        client.unlink("root-still-can")


def test_one_connection_cannot_open_handles_without_end(daemon: Served) -> None:
    from devanon.broker import server

    with connect(daemon.socket) as client:
        client.open("opened-often", PS, create=True).close()
        request = wire.OPEN.pack(0, 0, 0) + b"opened-often"
        opened = 0
        with pytest.raises(OSError) as refused:
            while opened <= server.MAX_HANDLES:
                for fd in client.call(wire.Op.OPEN, request)[1]:
                    os.close(fd)
                opened += 1
        assert opened == server.MAX_HANDLES and refused.value.errno == errno.EMFILE
        assert "close some" in str(refused.value)
        with pytest.raises(OSError, match="close some"):  # refused first: nothing made
            client.call(wire.Op.OPEN, wire.OPEN.pack(PS, 0o600, wire.OPEN_CREATE) + b"not-made")
        assert [info["name"] for info in client.stat()] == ["opened-often"]
        client.call(wire.Op.CLOSE, wire.HANDLE.pack(2))  # one closed: room for one again
        for fd in client.call(wire.Op.OPEN, request)[1]:
            os.close(fd)
        client.unlink("opened-often")


def _refusal(sock: socket.socket, message: bytes, fds: list[int]) -> tuple[int, int, int, str]:
    """Send a request the daemon must refuse; its reply's op, seq, errno and text."""
    _send(sock, message, fds)
    data = sock.recv(wire.MAX_MESSAGE)  # a socket timeout, not a hang, if no reply comes
    op, status, seq = wire.REPLY.unpack_from(data)
    assert status == wire.STATUS_ERROR, data
    (code,) = wire.ERROR.unpack_from(data, wire.REPLY.size)
    return op, seq, code, data[wire.REPLY.size + wire.ERROR.size :].decode()


def _links_of(pid: int) -> set[str]:
    """What the descriptors of ``pid`` are (their /proc links)."""
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def test_a_message_cut_short_is_refused_by_name_and_a_daemon_out_of_descriptors_recovers(
    daemon: Served,
) -> None:
    """The kernel cuts a message short when it is too long, carries too many descriptors,
    or carries descriptors the daemon has no room for. Each refusal names the request (its
    seq), so a client waiting for it wakes; the last is EMFILE, not the client's fault."""
    pid = daemon.process.pid
    with connect(daemon.socket) as client:
        obj = client.open("fds", 4 * PS, create=True)
        m = obj.map(0, PS)
        before = len(daemon_descriptors(pid))
        raw = _raw(daemon.socket)
        opened = _reply(raw, wire.request(wire.Op.OPEN, 1, wire.OPEN.pack(0, 0, 0) + b"fds"))
        pin = wire.pack_ranges(wire.OPENED.unpack(opened)[0], [(0, PS)])
        huge = wire.request(wire.Op.STAT, 2, b"x" * wire.MAX_MESSAGE)
        assert _refusal(raw, huge, [])[:3] == (wire.Op.STAT, 2, errno.EPROTO)
        unknown = wire.HEADER.pack(77, 0, 6)
        assert _refusal(raw, unknown, [])[:3] == (77, 6, errno.EPROTO)
        r, w = os.pipe()
        many = [r] * (wire.MAX_FDS + 1)
        op, seq, code, text = _refusal(raw, wire.request(wire.Op.PIN, 3, pin), many)
        assert (op, seq, code) == (wire.Op.PIN, 3, errno.EPROTO) and "descriptors" in text
        pipe = os.readlink(f"/proc/self/fd/{r}")
        assert wait_for(  # the copies it got are closed (by its closer thread, soon)
            lambda: pipe not in _links_of(pid)
        )
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(held) + 1)) - held)
        try:  # the next descriptor the daemon would get is past its limit
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
            op, seq, code, text = _refusal(raw, wire.request(wire.Op.PIN, 4, pin), [r])
            late = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            late.settimeout(10)
            late.connect(daemon.socket)  # no room for it: taken and closed, not left waiting
            assert late.recv(16) == b""
            late.close()
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert (op, seq, code) == (wire.Op.PIN, 4, errno.EMFILE) and "out of file" in text
        assert client.stat("fds")[0]["pinned_children"] == 0 and obj.map_count(0) == 1
        _reply(raw, wire.request(wire.Op.PIN, 5, pin), [r])  # room again: a pin holds
        assert obj.map_count(0) == 2
        os.close(w)  # the "child" is gone: its pin goes
        assert wait_for(lambda: obj.map_count(0) == 1)
        os.close(r)
        raw.close()
        m.close()
        assert obj.map_count(0) == 0 and client.verify("fds") == []
        assert wait_for(lambda: len(daemon_descriptors(pid)) == before)  # none leaked
        obj.close()


def test_a_bug_in_a_handler_cuts_its_client_off_and_the_daemon_serves_on(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure the daemon did not foresee is logged and the client it concerns is cut
    off (it would otherwise wait for a reply forever); the daemon serves the others."""
    from devanon.broker import objects
    from devanon.broker.server import Daemon

    served = Daemon(str(socket_dir / "in-process.sock"))
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    try:
        with connect(served.path) as victim, connect(served.path) as other:
            obj = victim.open("bug", 4 * PS, create=True)
            real = objects.SharedObject.unmap_one

            def unmap_one_once(self: objects.SharedObject, *args: int) -> None:
                monkeypatch.setattr(objects.SharedObject, "unmap_one", real)
                raise RuntimeError("an unforeseen bug")

            monkeypatch.setattr(objects.SharedObject, "unmap_one", unmap_one_once)
            obj.map(0, PS).close()  # its posted UNMAP meets the bug
            victim._sock.settimeout(5)  # a hang would be a timeout, not a close
            with pytest.raises(
                BrokerError, match=r"gone \((Connection reset|Broken pipe|it closed)"
            ):
                obj.map_count(0)
            survivor = other.open("bug")
            m = survivor.map(0, PS)
            assert survivor.map_count(0) == 1 and other.verify("bug") == []
            m.close()
            survivor.close()
    finally:
        served.stop()
        thread.join(10)


def test_data_in_pages_nobody_counts_is_punched(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that writes without a count (pwrite, or a mapping it never told of: a
    read fault fills a page too) leaves data that no unmap would free: the daemon punches
    it at its next sweep, and leaves counted pages as they are (SEEK_DATA tells)."""
    from devanon.broker import server

    monkeypatch.setattr(server, "SWEEP_EVERY_S", 0.2)
    served = server.Daemon(str(socket_dir / "sweep.sock"))
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    try:
        with connect(served.path) as client:
            obj = client.open("swept", 16 * PS, create=True)
            m = obj.map(2 * PS, 2 * PS)
            m.view()[:] = b"c" * 2 * PS  # counted
            os.pwrite(obj.fd, b"u" * PS, 8 * PS)  # not counted
            sneaky = mmap.mmap(obj.fd, PS, offset=12 * PS)  # mapped behind its back
            assert sneaky[0] == 0  # a read fault: the page is in memory now
            assert data_pages(obj.fd, 16 * PS, PS) == {2, 3, 8, 12}
            assert wait_for(lambda: data_pages(obj.fd, 16 * PS, PS) == {2, 3}, timeout=10)
            assert bytes(m.view()[:2]) == b"cc" and obj.map_count(2 * PS) == 1
            sneaky.close()
            m.close()
            obj.close()
    finally:
        served.stop()
        thread.join(10)


def _bytes_when_told(conn: Connection, m: Any, offsets: list[int]) -> None:
    conn.recv()
    conn.send(bytes(m.view()[o] for o in offsets))


def test_a_fork_pins_inherited_pages_however_many_pieces(daemon: Served, tmp_path: Path) -> None:
    """Overlays on every other page cut an inherited mapping into more pieces than one
    message holds: the PIN (and the UNMAP at close) go in as many messages as needed, all
    counted, and the client is never taken for a protocol offender."""
    pieces = wire.MAX_RANGES + 905
    with connect(daemon.socket) as client:
        obj = client.open("pieces", 2 * pieces * PS, create=True)
        m = obj.map(0, 2 * pieces * PS, inherit=True)
        m.view()[:] = b"\x01" * (2 * pieces * PS)
        (tmp_path / "zero").write_bytes(bytes(PS))
        for i in range(pieces):
            obj.overlay(m.address + (2 * i + 1) * PS, str(tmp_path / "zero"), 0, PS)
        ends = [0, 2 * (pieces - 1) * PS]
        proc, conn = worker(_bytes_when_told, m, ends)
        assert obj.map_count(0) == 2 and obj.map_count(ends[1]) == 2
        obj.unmap(m.address, PS)
        obj.unmap(m.address + ends[1], PS)
        obj.flush()
        assert obj.map_count(0) == 1  # the child's pin holds every piece
        conn.send("read")
        assert conn.recv() == b"\x01\x01"  # nothing was punched under the child
        proc.join(10)
        assert wait_for(lambda: obj.stats().clients[0]["mapped_bytes"] == (pieces - 2) * PS)
        m.close()  # one UNMAP of pieces - 2 ranges: more than one message holds
        obj.flush()
        assert obj.map_count(2 * PS) == 0 and obj.resident_bytes() == 0
        assert client.verify("pieces") == []
        obj.close()


def test_a_call_from_a_signal_handler_does_not_leave_the_waiting_call_hung(
    daemon: Served,
) -> None:
    """A handler's call that reads the waiting call's reply keeps it for that call, and
    the waiting call finds it (it no longer sleeps in a blocking receive meanwhile)."""
    with connect(daemon.socket) as client:
        a = client.open("a", PS, create=True)
        b = client.open("b", PS, create=True)
        got: list[int] = []

        def handler(signum: int, frame: object) -> None:
            got.append(b.map_count(0))

        def hung(signum: int, frame: object) -> None:
            raise TimeoutError("the waiting call hung")

        old = signal.signal(signal.SIGALRM, handler), signal.signal(signal.SIGUSR1, hung)
        resume = threading.Timer(0.5, lambda: os.kill(daemon.process.pid, signal.SIGCONT))
        watchdog = threading.Timer(10, lambda: os.kill(os.getpid(), signal.SIGUSR1))
        try:
            os.kill(daemon.process.pid, signal.SIGSTOP)  # the outer call waits...
            signal.setitimer(signal.ITIMER_REAL, 0.2)  # ...when the handler calls too
            resume.start()
            watchdog.start()
            assert a.map_count(0) == 0 and got == [0]
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
            resume.cancel()
            watchdog.cancel()
            signal.signal(signal.SIGALRM, old[0])
            signal.signal(signal.SIGUSR1, old[1])
        a.close()
        b.close()


def test_stat_lists_more_objects_than_one_message_holds_in_pages(daemon: Served) -> None:
    """``stat()`` of all objects comes in pages by name, so no number of objects is too
    many; each object comes once, in order, as the daemon shows it alone. Asked in one
    message (no FLAG_AFTER), the list is refused with EMSGSIZE, by name of the remedy, and
    the connection goes on (it used to come back as cut-off JSON). ``devanon stat --json``
    lists them all."""
    with connect(daemon.socket) as client:
        made: list[str] = []
        while len(json.dumps(client.stat(made[0]) if made else [])) * len(made) < 3 * (
            wire.MAX_MESSAGE
        ):
            name = f"many-{len(made):04d}-" + "x" * 200  # long names: fewer objects to make
            client.open(name, PS, create=True).close()
            made.append(name)
        with pytest.raises(OSError, match="ask for one object by name") as refused:
            client.call(wire.Op.STAT)
        assert refused.value.errno == errno.EMSGSIZE
        client.open("a-first", PS, create=True).close()  # made last, listed first
        made.append("a-first")
        listed = client.stat()
        assert [o["name"] for o in listed] == sorted(made)
        assert listed[-1] == client.stat(listed[-1]["name"])[0]
        out = subprocess.run(
            [sys.executable, "-m", "devanon.cli", "stat", "--socket", daemon.socket, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert [o["name"] for o in json.loads(out.stdout)] == sorted(made)
        for name in made:
            client.unlink(name)
        assert client.stat() == []


def test_an_object_with_more_clients_than_a_message_holds_is_listed_with_some(
    daemon: Served,
) -> None:
    """An object opened by so many connections that its STAT entry would be over a message
    is shown with the clients that fit and ``clients_omitted``, by name and in the pages,
    and the objects after it are listed too."""
    many = 1500  # ~45 bytes of JSON a client: over 64 KiB
    with connect(daemon.socket) as client:
        client.open("crowded", PS, create=True, mode=0o644).close()
        client.open("quiet", PS, create=True).close()
        holders = [_raw(daemon.socket) for _ in range(many)]
        try:
            for sock in holders:  # each connection holds the object open
                _reply(sock, wire.request(wire.Op.OPEN, 1, wire.OPEN.pack(0, 0, 0) + b"crowded"))
            (alone,) = client.stat("crowded")
            listed = client.stat()
            with client.open("crowded") as crowded:  # one client more
                stats = crowded.stats()
            assert len(stats.clients) + stats.clients_omitted == many + 1
        finally:
            for sock in holders:
                sock.close()
        assert [o["name"] for o in listed] == ["crowded", "quiet"]
        for shown in (alone, listed[0]):
            assert len(json.dumps(shown)) <= wire.MAX_MESSAGE
            assert 1000 < len(shown["clients"]) < many
            assert len(shown["clients"]) + shown["clients_omitted"] == many
        assert "clients_omitted" not in listed[1]
        assert wait_for(lambda: client.stat("crowded")[0]["clients"] == [])
        client.unlink("crowded")
        client.unlink("quiet")


def test_verify_lists_more_differences_than_one_message_holds_in_pages(daemon: Served) -> None:
    """Counts the kernel does not bear out (mappings unmapped behind the client's back),
    more of them than one message holds: ``verify()`` lists every one, in page order, from
    pages; asked in one message (no FLAG_AFTER), VERIFY is refused with EMSGSIZE naming the
    remedy (it used to be the only answer). ``devanon stat --verify`` lists them all."""
    n = 1500  # ~78 bytes of JSON a difference: two pages
    with connect(daemon.socket) as client:
        obj = client.open("broken", 2 * n * PS, create=True)
        maps = [obj.map(2 * i * PS, PS) for i in range(n)]  # every other page: n runs
        unmap_every_mapping_of(os.fstat(obj.fd))
        assert kernel_counts(obj.fd, [os.getpid()]) == {}
        diffs = client.verify("broken")
        assert diffs == [
            {"first_page": 2 * i, "stop_page": 2 * i + 1, "daemon_count": 1, "kernel_count": 0}
            for i in range(n)
        ]
        with pytest.raises(OSError, match=r"in pages \(FLAG_AFTER\)") as refused:
            client.call(wire.Op.VERIFY, b"broken")
        assert refused.value.errno == errno.EMSGSIZE
        cli = [sys.executable, "-m", "devanon.cli", "stat", "--socket", daemon.socket]
        out = subprocess.run(
            [*cli, "--json", "--verify", "broken"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0 and "differ" in out.stderr
        assert json.loads(out.stdout)[0]["differences"] == diffs
        for m in maps:  # the client's books still hold them: give the counts back
            m.close()
        assert client.verify("broken") == []
        assert obj.resident_bytes() == 0
        obj.close()
        client.unlink("broken")


def test_a_daemon_that_lost_its_reserve_descriptor_takes_it_back(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors, the daemon turns a connection away with the one it holds in
    reserve. If it cannot take that one back at once (another took the slot), it does at
    the next accept with room, and turns connections away again when it runs out."""
    import resource

    from devanon.broker import server

    daemon = server.Daemon(str(socket_dir / "reserve.sock"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filled: list[int] = []

    def run_out() -> None:
        with contextlib.suppress(OSError):
            while True:
                filled.append(os.open(os.devnull, os.O_RDONLY))

    def client() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5)
        sock.connect(daemon.path)
        return sock

    real_open = os.open

    def slot_taken(*args: Any, **kwargs: Any) -> int:
        monkeypatch.setattr(server.os, "open", real_open)
        raise OSError(errno.EMFILE, "the slot went to another thread")

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
        first = client()
        run_out()
        monkeypatch.setattr(server.os, "open", slot_taken)
        daemon._accept()
        assert first.recv(1) == b"" and daemon._reserve < 0  # turned away, reserve lost
        while filled:
            os.close(filled.pop())
        served = client()
        daemon._accept()  # room again: the reserve comes back, the client is served
        assert daemon._reserve >= 0 and len(daemon.peers) == 1
        late = client()
        run_out()
        daemon._accept()
        assert late.recv(1) == b""  # turned away again, not left waiting
        for sock in (first, served, late):
            sock.close()
    finally:
        while filled:
            os.close(filled.pop())
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        daemon._shutdown()
