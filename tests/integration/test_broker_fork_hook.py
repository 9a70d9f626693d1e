"""An interrupt in the client's fork hook: the child still never speaks for its parent.

CPython does not let a fork hook's exception stop the fork (it reports it and forks on),
so a signal handler's exception (Ctrl-C) can leave ``Client._after_fork_in_child`` half
done in the child. Wherever it comes, the child's next requests must go on a connection
of its own, for its own reopened objects: the daemon's counts then agree with every
client's ``/proc/PID/maps`` (``verify``), and the parent's connection and pages are as
they were.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from broker_daemon import Served

_SCRIPT = """
import os, sys
sys.path[:0] = [TESTS]
from support import interrupt_at, lines_after_calls
from devanon.broker import BrokerError, Client, connect
PS = os.sysconf("SC_PAGE_SIZE")
sys.unraisablehook = lambda u: None  # the fork reports the hook's exception: expected
client = connect(SOCKET)
a = client.open("hooked-a", 4 * PS, create=True)
client.open("hooked-b", 4 * PS, create=True).close()
kept = a.map(0, PS)
kept.view()[:1] = b"p"
code = Client._after_fork_in_child.__code__
for line in lines_after_calls(code):
    with interrupt_at(code, line) as fired:
        pid = os.fork()
    if pid == 0:
        sys.settrace(None)
        status = 0 if fired[0] else 3
        try:
            b = client.open("hooked-b")  # the handle a stale one would collide with
            m = a.map(PS, PS)
            m.view()[:1] = b"c"
            if client.verify("hooked-a") or client.verify("hooked-b"):
                status = 4
        except BrokerError:
            pass  # a clear error is allowed; a wrong count is not
        except BaseException:
            status = 5
        os._exit(status)
    _, wait = os.waitpid(pid, 0)
    parent_ok = (
        a.map_count(0) == 1
        and client.verify("hooked-a") == []
        and bytes(kept.view()[:1]) == b"p"
    )
    print(line, os.waitstatus_to_exitcode(wait), parent_ok, flush=True)
kept.close()
a.close()
"""


def test_an_interrupt_in_the_clients_fork_hook_never_mixes_connections(
    daemon: Served,
) -> None:
    tests = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        [sys.executable, "-c", f"TESTS = {tests!r}\nSOCKET = {daemon.socket!r}\n" + _SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) >= 4, done.stdout  # every line a handler can reach, each one fired
    assert all(row[1:] == ["0", "True"] for row in rows), done.stdout
