"""What the daemon does with descriptors clients send: nothing that waits."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from devanon.broker import received
from devanon.broker.received import Closer


def test_files_wait_for_the_thread_and_the_rest_close_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file's close may wait on its file system (a FUSE server): files go to the
    closer's thread, whose backlog shows one that blocks; pipes close at once."""
    release = threading.Event()
    real_close = os.close
    files = [os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_RDONLY) for i in range(4)]

    def close(fd: int) -> None:
        if fd == files[0]:
            release.wait(10)  # a flush that waits on its server
        real_close(fd)

    monkeypatch.setattr(received.os, "close", close)
    closer = Closer()
    r, w = os.pipe()
    closer.close([*files, r])
    with pytest.raises(OSError):
        os.fstat(r)  # closed already, by this thread
    for _ in range(100):  # the thread takes the first, and waits in its close
        if closer.backlog == 3:
            break
        threading.Event().wait(0.05)
    assert closer.backlog == 3  # behind the one that blocks
    for fd in files:
        os.fstat(fd)  # still open
    release.set()
    closer.stop(5)
    for fd in files:
        with pytest.raises(OSError):
            os.fstat(fd)
    real_close(w)
