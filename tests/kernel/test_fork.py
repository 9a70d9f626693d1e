"""fork(): a child never frees what its parent maps, and the parent frees what the child left."""

from __future__ import annotations

import errno
import os

import oracle
import pytest
from support import run_child, run_script, start_child

import devanon

PS = devanon.PAGE_SIZE


def test_mappings_are_not_inherited_by_default() -> None:
    with devanon.Anon(8 * PS) as mem:
        m = mem.map(0, 8 * PS)
        m.view()[:] = b"p" * 8 * PS
        view = m.view()

        def child() -> int:
            # the kernel gave the child no mapping of the memfd, and devanon knows it
            assert oracle.maps_counts(mem.fd, PS) == {}
            assert mem.map_count(0) == 0 and mem.stats().mappings == 0
            assert bytes(view[:4]) == bytes(4)  # the copied view is quarantined, no crash
            # the child may not map: its parent could not count it, and would punch under it
            try:
                mem.map(0, 8 * PS)
            except ValueError as e:
                assert "forked" in str(e) and "devanon.broker" in str(e)
            else:
                return 1
            assert oracle.maps_counts(mem.fd, PS) == {}
            return 0

        assert run_child(child) == 0
        view.release()
        assert bytes(m.view()) == b"p" * 8 * PS
        assert mem.resident_bytes() == 8 * PS
        m.close()
        assert mem.resident_bytes() == 0


def test_an_inherited_mapping_outlives_the_parents_unmap() -> None:
    with devanon.Anon(8 * PS) as mem:
        m = mem.map(0, 8 * PS, inherit=True)
        m.view()[:] = b"i" * 8 * PS
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()

        def child() -> int:
            os.close(to_child_w)
            os.close(to_parent_r)
            assert oracle.maps_counts(mem.fd, PS) == dict.fromkeys(range(8), 1)
            os.write(to_parent_w, b"1")
            os.read(to_child_r, 1)  # the parent has unmapped by now
            view = m.view()
            assert bytes(view) == b"i" * 8 * PS
            view[0] = ord("k")
            return 0

        pid = start_child(child)
        os.close(to_child_r)
        os.close(to_parent_w)
        assert os.read(to_parent_r, 1) == b"1"
        assert mem.map_count(0) == 2  # ours and the child's copy
        m.close()
        assert mem.map_count(0) == 1 and mem.resident_bytes() == 8 * PS  # pinned, not punched
        os.write(to_child_w, b"go")
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        # the child is gone: the next call drops its pin and punches
        assert mem.map_count(0) == 0
        assert mem.resident_bytes() == 0
        assert oracle.data_pages(mem.fd, mem.size, PS) == set()


def test_a_child_whose_pages_cannot_be_pinned_gets_no_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No lifeline pipe at fork (EMFILE): the parent cannot pin the inherited pages, so
    the child drops its copies (views quarantined) and is a child all the same (it may not
    map): otherwise the parent's unmap would punch the pages under it."""
    with devanon.Anon(8 * PS) as mem:
        m = mem.map(0, 8 * PS, inherit=True)
        m.view()[:] = b"i" * 8 * PS
        view = m.view()

        def no_pipe(flags: int) -> tuple[int, int]:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(os, "pipe2", no_pipe)

        def child() -> int:
            assert oracle.maps_counts(mem.fd, PS) == {}  # the kernel's view: no copy
            assert mem.stats().mappings == 0 and m.closed
            assert bytes(view[:4]) == bytes(4)  # quarantined, no crash
            with pytest.raises(ValueError, match="forked"):
                mem.map(0, PS)
            return 0

        assert run_child(child) == 0
        monkeypatch.undo()
        view.release()
        assert mem.map_count(0) == 1  # ours alone: no pin
        m.close()
        assert mem.resident_bytes() == 0


def test_pages_a_child_wrote_after_the_parent_let_go_are_swept_after_it_exits() -> None:
    with devanon.Anon(16 * PS) as mem:
        keep = mem.map(0, 4 * PS)
        keep.view()[0] = 1
        shared = mem.map(8 * PS, 8 * PS, inherit=True)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(w)
                os.read(r, 1)  # the parent has let go of `shared` by now
                shared.view()[:] = b"c" * 8 * PS  # and exit while mapped: no unmap
                code = 0
            finally:
                os._exit(code)
        os.close(r)
        shared.close()
        assert mem.map_count(8 * PS) == 1  # the child's pin
        os.write(w, b"g")
        os.close(w)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert mem.resident_bytes() == PS  # this call saw the child gone and swept
        assert oracle.data_pages(mem.fd, mem.size, PS) == {0}
        keep.close()
        assert mem.resident_bytes() == 0


def test_overlaying_an_anon_with_its_own_file_is_refused() -> None:
    with devanon.Anon(4 * PS) as mem:
        m = mem.map(0, 4 * PS)
        with pytest.raises(ValueError, match="its own file"):
            mem.overlay(m.address, mem.fd, 0, PS)
        assert mem.map_count(0) == 1
        m.close()


def test_an_anon_made_while_fork_takes_the_locks_is_not_inherited_uncounted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread may make and map an Anon while the fork hook takes the locks of the
    ones it knows: that one must be prepared too, or the child would inherit its mapping
    uncounted, and free the parent's data when it unmaps it."""
    made: list[devanon.Anon] = []
    with devanon.Anon(PS) as first:
        first.map(0, PS)
        prepare = first._prepare_fork

        def prepare_and_meanwhile_make_another(lifeline: int) -> None:
            prepare(lifeline)
            if not made:  # what another thread could do at this moment
                late = devanon.Anon(PS)
                late.map(0, PS).view()[:4] = b"late"
                made.append(late)

        monkeypatch.setattr(first, "_prepare_fork", prepare_and_meanwhile_make_another)

        def child() -> int:
            return 0 if oracle.maps_counts(made[0].fd, PS) == {} else 1

        assert run_child(child) == 0  # MADV_DONTFORK reached the late mapping too
    late = made[0]
    assert late.map_count(0) == 1 and oracle.resident_bytes(late.fd) == PS
    late.close()


_CONCURRENT_FORKS = """
import os, threading, time
import devanon

def fork_and_reap():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

for trial in range(40):
    first = devanon.Anon(1 << 16)
    gate = threading.Event()
    def holder():
        with first._lock:  # a thread busy with the object while two others fork
            gate.set()
            time.sleep(0.02)
    threads = [threading.Thread(target=holder)]
    threads[0].start()
    gate.wait()
    threads.append(threading.Thread(target=fork_and_reap))
    threads[1].start()
    time.sleep(0.005)
    second = devanon.Anon(1 << 16)  # made while the first fork waits for a lock
    threads.append(threading.Thread(target=fork_and_reap))
    threads[2].start()
    for t in threads:
        t.join()
    first.close()
    second.close()
print("no hang")
"""

_CLOSE_DURING_FORK = """
import os, signal
os.register_at_fork(before=lambda: os.kill(os.getpid(), signal.SIGUSR1))
import devanon
victim = devanon.Anon(1 << 16)
signal.signal(signal.SIGUSR1, lambda *_: victim.close())
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print("no hang", victim.closed)
"""


_NESTED_FORK = """
import os, signal
import devanon
PS = devanon.PAGE_SIZE
mem = devanon.Anon(4 * PS)
m = mem.map(0, 4 * PS, inherit=True)
m.view()[:] = b"p" * 4 * PS
r, w = os.pipe()

def handler(*_):
    pid = os.fork()  # nested in the outer fork's hooks: nothing is pinned for this child
    if pid == 0:
        maps = open("/proc/self/maps").read()
        ok = mem._fork.is_child and m.closed and f" {os.fstat(mem.fd).st_ino} " not in maps
        if not m.closed:
            m.close()  # as a child may: it must never punch its parent's pages
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)

signal.signal(signal.SIGUSR1, handler)
prepare = mem._prepare_fork

def prepare_and_get_a_signal(lifeline):
    prepare(lifeline)
    signal.raise_signal(signal.SIGUSR1)

mem._prepare_fork = prepare_and_get_a_signal
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
child_ok = os.read(r, 1) == b"1"
intact = bytes(m.view()) == b"p" * 4 * PS and mem.resident_bytes() == 4 * PS
print("no hang", child_ok, intact)
"""


_FORK_RIGHT_AFTER_THE_FORK_LOCK = """
import os, signal
import devanon
from devanon import forking
mem = devanon.Anon(devanon.PAGE_SIZE)
mem.map(0, devanon.PAGE_SIZE)

def handler(*_):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

class SignalledRightAfter:
    \"\"\"The fork lock, with a signal arriving just as acquire() returns.\"\"\"
    def __init__(self, lock):
        self.lock, self.fired = lock, False
    def acquire(self, *args):
        got = self.lock.acquire(*args)
        if not self.fired:
            self.fired = True
            signal.raise_signal(signal.SIGUSR1)  # its handler runs here, and forks
        return got
    def release(self):
        self.lock.release()

signal.signal(signal.SIGUSR1, handler)
forking._fork_lock = SignalledRightAfter(forking._fork_lock)
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("no hang")
"""

_NESTED_FORK_IN_THE_CHILDS_HOOK = """
import os, signal
import devanon
PS = devanon.PAGE_SIZE
a = devanon.Anon(8 * PS)
keep = a.map(0, 2 * PS, inherit=True)
gone = [a.map(2 * PS + i * PS, PS) for i in range(3)]  # not inherited: any child drops them
r, w = os.pipe()

def handler(*_):
    if os.fork() == 0:
        return  # the grandchild goes on with its parent's interrupted hook
    os.wait()

signal.signal(signal.SIGUSR1, handler)
forget, top, fired = a._forget, os.getpid(), []

def forget_and_get_a_signal(pieces):
    out = forget(pieces)
    if os.getpid() != top and not fired:  # in the child, half way through its hook
        fired.append(1)
        signal.raise_signal(signal.SIGUSR1)
    return out

a._forget = forget_and_get_a_signal
if os.fork() == 0:
    books = (len(a._segments), a._nmappings, keep._pieces, [g._pieces for g in gone])
    os.write(w, f"{books}\\n".encode())
    os._exit(0)
os.wait()
os.close(w)
print(sorted(os.read(r, 1000).decode().split("\\n")))
"""


def test_a_fork_right_after_another_took_the_fork_lock_does_not_hang() -> None:
    """A signal handler that forks just after the outer fork took the fork lock (before it
    could note it was the owner) makes a whole fork of its own rather than wait for
    itself."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FORK_RIGHT_AFTER_THE_FORK_LOCK],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and done.stdout == "no hang\n", done.stdout + done.stderr


def test_a_fork_nested_in_the_childs_own_hook_keeps_both_books_right() -> None:
    """A fork nested in the child's after-fork hook, half way through dropping what the
    child did not inherit: the grandchild drops everything once (no segment forgotten
    twice), the child keeps exactly the inherited mapping."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _NESTED_FORK_IN_THE_CHILDS_HOOK],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr
    grandchild, child = "(0, 0, 0, [0, 0, 0])", "(1, 1, 1, [0, 0, 0])"
    assert done.stdout.strip() == str(sorted(["", grandchild, child])), done.stdout


def test_a_fork_nested_in_another_forks_hooks_leaves_its_child_nothing() -> None:
    """A signal handler that forks while another fork's hooks run: nothing was pinned for
    its child, which therefore drops its copies (the kernel shows it none) and is a child:
    its unmap cannot punch the parent's pages."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _NESTED_FORK], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["no", "hang", "True", "True"], done.stdout + done.stderr


@pytest.mark.parametrize("script", [_CONCURRENT_FORKS, _CLOSE_DURING_FORK])
def test_forks_from_several_threads_or_a_signal_handler_do_not_hang(script: str) -> None:
    """Two threads forking at once (the hooks take one fork at a time), and a signal
    handler closing an object in the middle of a fork (nothing is held across it that
    closing needs)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no hang"), done.stdout + done.stderr


_VIEW_LOCK_HELD_AT_FORK = """
import os, threading, time
import devanon

mem = devanon.Anon(1 << 16)
m = mem.map(0, 1 << 16)
view = m.view()
gate, done = threading.Event(), threading.Event()
def holder():
    with m._views._lock:  # as a view dying in this thread at the moment of fork would
        gate.set()
        done.wait()
t = threading.Thread(target=holder)
t.start()
gate.wait()
pid = os.fork()  # the child quarantines the mapping it does not inherit: the tracker's lock
if pid == 0:
    del view
    os._exit(0)
for _ in range(500):
    if os.waitpid(pid, os.WNOHANG)[0]:
        print("child done")
        break
    time.sleep(0.01)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("child hung")
done.set()
t.join()
"""


def test_a_view_lock_held_by_another_thread_at_fork_does_not_hang_the_child() -> None:
    """A thread holds a mapping's view lock at fork (a view dying there): the child, which
    quarantines that mapping (not inherited, views alive), still gets the lock."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _VIEW_LOCK_HELD_AT_FORK],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "child done", out.stderr


_INTERRUPTED_FORK_HOOKS = """
import contextlib, os, sys, threading
sys.path[:0] = [TESTS]
from support import interrupt_at, lines_after_calls
import devanon
from devanon import forking
PS = devanon.PAGE_SIZE
sys.unraisablehook = lambda u: None  # the fork reports the hook's exception: expected
forking.log.disabled = True  # (and so does the child's hook)
for hook in (forking._before, forking._after_in_child, forking._child_objects):
    code = hook.__code__
    for line in lines_after_calls(code):
        a, b = devanon.Anon(4 * PS), devanon.Anon(4 * PS)
        ma, mb = a.map(0, PS), b.map(0, PS)
        ma.view()[:] = b"a" * PS
        mb.view()[:] = b"b" * PS
        with interrupt_at(code, line) as fired:
            pid = os.fork()
        if pid == 0:  # a child closes what it holds: it must not punch its parent's pages
            sys.settrace(None)
            for m in (ma, mb):
                with contextlib.suppress(Exception):
                    m.close()
            os._exit(0 if fired[0] else 3)
        _, status = os.waitpid(pid, 0)
        fired = fired[0] or os.waitstatus_to_exitcode(status) == 0
        kept = (os.pread(a.fd, 1, 0), os.pread(b.fd, 1, 0)) == (b"a", b"b")
        closer = threading.Thread(target=lambda: [x.close() for x in (ma, mb, a, b)], daemon=True)
        closer.start()
        closer.join(10)  # another thread: a lock the hook kept would stop it
        print(hook.__name__, line, fired, kept, not closer.is_alive(), flush=True)
        if closer.is_alive():
            sys.exit(1)
"""


def test_an_interrupt_in_a_fork_hook_leaves_no_child_that_punches() -> None:
    """A signal handler's exception in a fork hook does not stop the fork (CPython
    reports it and forks all the same): wherever it comes in the before-fork hook or the
    child's, the child must not punch pages its parent maps (objects a hook did not finish
    get no copies in the child), and no object's lock stays taken."""
    rows = run_script(_INTERRUPTED_FORK_HOOKS, 240)
    fired = [row for row in rows if row[2] == "True"]  # (an EMFILE branch is not reached)
    for hook in ("_before", "_after_in_child", "_child_objects"):
        assert sum(row[0] == hook for row in fired) >= 3, rows
    assert all(row[3:] == ["True", "True"] for row in fired), rows
