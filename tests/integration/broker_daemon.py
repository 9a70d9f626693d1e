"""Starting and stopping a real daemon (`devanon serve` in its own process) for tests."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Served:
    """A running daemon: its socket and process. A thread reads what it logs as it comes:
    a daemon whose log pipe is full blocks in its logging, and every client with it."""

    socket: str
    process: subprocess.Popen[str]
    _log: list[str] = field(default_factory=list)
    _log_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        threading.Thread(target=self._drain, name="daemon-log", daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._log_lock:
                self._log.append(line)

    def read_log(self) -> str:
        """What the daemon logged since the last call."""
        with self._log_lock:
            text, self._log[:] = "".join(self._log), []
        return text

    def stop(self) -> int:
        """SIGTERM; returns the exit code (the test fails if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


def start_daemon(socket: str, *extra: str) -> Served:
    process = subprocess.Popen(
        [sys.executable, "-m", "devanon.cli", "serve", "--socket", socket, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if "listening on" in line:
                return Served(socket, process)
            if not line and process.poll() is not None:
                break
    process.kill()
    raise RuntimeError(f"devanon serve did not start: {process.stdout.read()}")


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``check`` until it holds (the daemon handles a death asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def daemon_descriptors(pid: int) -> dict[int, str]:
    """The descriptors the daemon holds, and what each points at. A /proc file is left
    out: the daemon reads /proc only for a moment (/proc/loadavg every 10 ms, the clients'
    maps for VERIFY), and a look that came just then would see one it does not hold."""
    links: dict[int, str] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            if not link.startswith("/proc/"):
                links[int(name)] = link
    return links


@contextlib.contextmanager
def busy_cpus(n: int) -> Iterator[None]:
    """``n`` processes spinning in Python, killed on the way out."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
