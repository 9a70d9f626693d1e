"""Starting and stopping a real daemon (`devanon serve` in its own process) for tests."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Served:
    """A running daemon: its socket and process."""

    socket: str
    process: subprocess.Popen[str]

    def read_log(self) -> str:
        """What the daemon logged since the last call (its stdout pipe is non-blocking;
        reading it also keeps the daemon from ever blocking on a full pipe)."""
        assert self.process.stdout is not None
        chunks = []
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.process.stdout.fileno(), 1 << 16):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

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
                os.set_blocking(process.stdout.fileno(), False)
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
