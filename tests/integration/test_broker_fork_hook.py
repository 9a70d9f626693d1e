"""Interrupts in the fork hooks of a broker client: the child never speaks for its parent,
and never takes a count its parent's pages need.

CPython does not let a fork hook's exception stop the fork (it reports it and forks on),
so a signal handler's exception (Ctrl-C) can leave ``Client._after_fork_in_child`` half
done in the child. Wherever it comes, the child's next requests must go on a connection
of its own, for its own reopened objects: the daemon's counts then agree with every
client's ``/proc/PID/maps`` (``verify``), and the parent's connection and pages are as
they were.
"""

from __future__ import annotations

from broker_daemon import Served
from support import run_script

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
    rows = run_script(_SCRIPT, 120, SOCKET=daemon.socket)
    assert len(rows) >= 4, rows  # every line a handler can reach, each one fired
    assert all(row[1:] == ["0", "True"] for row in rows), rows


_OBJECT_HOOKS = """
import contextlib, os, sys, threading, time
sys.path[:0] = [TESTS]
from support import interrupt_at, lines_after_calls
from devanon import forking
from devanon.broker import SharedAnon, connect
from devanon.mapper import Mapper
PS = os.sysconf("SC_PAGE_SIZE")
sys.unraisablehook = lambda u: None  # the fork reports the hook's exception: expected
forking.log.disabled = True
client = connect(SOCKET)
hooks = (
    forking._before, forking._after_in_child, forking._child_objects,
    SharedAnon._prepare_fork, SharedAnon._fork_child, Mapper._prepare_fork,
    Mapper._drop_uninherited,
)
for k, hook in enumerate(hooks):
    code = hook.__code__
    for line in lines_after_calls(code):
        name = f"hooked-{k}-{line}"
        obj = client.open(name, 4 * PS, create=True)
        ma, mb = obj.map(0, PS, inherit=True), obj.map(PS, PS)
        ma.view()[:1], mb.view()[:1] = b"a", b"b"
        with interrupt_at(code, line) as fired:
            pid = os.fork()
        if pid == 0:  # the child lets go of all it holds: none of it may free a parent's page
            sys.settrace(None)
            for m in (ma, mb):
                with contextlib.suppress(Exception):
                    m.close()
            with contextlib.suppress(Exception):
                obj.close()
            os._exit(0 if fired[0] else 3)
        _, status = os.waitpid(pid, 0)
        fired = fired[0] or os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.05)  # the daemon reads the child's lifeline EOF and its connection's end
        obj.flush()
        kept = os.pread(obj.fd, 1, 0) + os.pread(obj.fd, 1, PS) == b"ab"
        under = [d for d in client.verify(name) if d["daemon_count"] < d["kernel_count"]]
        closer = threading.Thread(target=lambda: [x.close() for x in (ma, mb, obj)], daemon=True)
        closer.start()
        closer.join(10)  # another thread: a lock the hook kept would stop it
        print(hook.__qualname__, line, fired, kept, not under, not closer.is_alive(), flush=True)
        if closer.is_alive():
            sys.exit(1)
        client.unlink(name)
"""


def test_an_interrupt_in_a_fork_hook_never_frees_a_shared_page_the_parent_maps(
    daemon: Served,
) -> None:
    """Wherever a signal handler's exception comes in the fork hooks (the device's, run for
    a SharedAnon, and its own), the child that then closes everything it holds must not
    take a count its parent's pages need: they keep their data, the daemon counts them at
    least as the kernel shows them mapped, and no lock stays taken."""
    rows = run_script(_OBJECT_HOOKS, 240, SOCKET=daemon.socket)
    fired = [row for row in rows if row[2] == "True"]
    assert len(fired) >= 20, rows
    assert all(row[3:] == ["True", "True", "True"] for row in fired), rows
