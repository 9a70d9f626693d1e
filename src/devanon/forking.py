"""fork(): children keep counted pages alive, and never punch what a parent may still use.

The 2004 patch counted only at mmap time: fork copied the mappings without a count, so a
child's exit could free pages its parent still used. Here:

- A mapping is not inherited (MADV_DONTFORK) unless it was made with ``inherit=True``; the
  child's copy of the object forgets those mappings.
- For inherited mappings, the parent pins their pages with one more count per child, held
  by the read end of a pipe whose write end only the child (and its own children) hold.
  The write end closes exactly when no descendant can map the pages any more: at exit, or
  at exec (it is close-on-exec, and exec drops mappings too). An ``Anon`` notices EOF at
  its next call, drops the pins and punches every page left with no count (it sweeps the
  file with SEEK_DATA: the child may have written anywhere it was allowed to); a broker
  object hands the read end to the daemon, which does the same. MADV_DONTFORK is applied
  just before fork (``Mapper._prepare_fork``), not at every map.
- A child whose pages could not be pinned (no pipe, a PIN the daemon refused, a fork
  nested in another fork's hooks by a signal handler) gets no copies: it unmaps them.
- A child of an ``Anon`` never punches, and may not map pages of it either: it cannot
  know what its parent (or a sibling) maps, nor tell them what it maps. It uses and unmaps
  what it inherited. Processes that share memory as equals use the broker, which counts
  for all.

The hooks hold every tracked object's lock across fork(), so no child inherits half-updated
books; forks go one at a time, and an object another thread makes during one waits until it
is done (its mapping would reach the child uncounted).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Protocol

from devanon import views
from devanon.counts import MapCounts, PageRange


class Forkable(Protocol):
    """What the fork hooks need of an object (Anon, broker.SharedAnon)."""

    _lock: threading.RLock

    @property
    def closed(self) -> bool: ...

    def _prepare_fork(self, lifeline: int) -> None:
        """In the parent, just before fork: keep uninherited mappings from the child; an
        object counted elsewhere (the broker's daemon) pins what the child will inherit
        with ``lifeline`` (a pipe's read end, borrowed), so a parent killed during the fork
        cannot take those counts with it."""

    def _forked(self, lifeline: int) -> None:
        """In the parent, after fork (or a failed one): pin what the child inherited, if not
        pinned already; owns ``lifeline``."""

    def _fork_child(self, pinned: bool) -> bool:
        """In the child, after fork: drop what the child did not inherit; if its pages
        could not be pinned (``pinned`` False), drop the inherited mappings too (nobody
        counts them: the parent could free their pages under the child). Returns whether
        the child keeps a pin (else its lifeline is closed at once: what was pinned, if
        anything, is let go)."""


@dataclass(slots=True)
class Child:
    """A forked child's pins, held until ``lifeline`` (a pipe's read end) reads EOF."""

    lifeline: int
    pins: list[PageRange]


@dataclass(slots=True)
class ForkState:
    """An Anon's view of fork: its children's pins, or the fact that it is a child."""

    children: list[Child] = field(default_factory=list)
    is_child: bool = False

    def reap(self, counts: MapCounts) -> bool:
        """Drop the pins of children that are gone; True if any was."""
        gone = False
        for child in list(self.children):
            if alive(child.lifeline):
                continue
            os.close(child.lifeline)
            self.children.remove(child)
            for first, last in child.pins:
                counts.remove(first, last)
            gone = True
        return gone

    def close(self) -> None:
        for child in self.children:
            os.close(child.lifeline)
        self.children.clear()


def alive(lifeline: int) -> bool:
    """False once every holder of the pipe's write end is gone (EOF)."""
    try:
        return os.read(lifeline, 1) != b""
    except BlockingIOError:
        return True


log = logging.getLogger("devanon")

_live: weakref.WeakSet[Forkable] = weakref.WeakSet()
_held: list[tuple[Forkable, tuple[int, int] | None]] = []
_ACQUIRE = operator.methodcaller("acquire")
_lifelines: list[int] = []
"""In a child: the write ends that tell each ancestor's objects we are alive."""


_track_lock = threading.RLock()
"""Held only while the set changes or is read (reentrant: a signal handler may close an
object while its thread reads the set)."""
_track_cond = threading.Condition(_track_lock)
_fork_lock = threading.RLock()
"""One fork at a time: the hooks of two threads forking at once would share ``_held``.
Reentrant: a signal handler that forks just after ``_before`` took it, before it could say
so in ``_owner``, makes a whole fork of its own then (rather than wait for itself)."""
_owner: int | None = None
"""The thread that holds ``_fork_lock`` (its hooks, and nobody else's, do the work)."""
_forker: int | None = None
"""Set once the forking thread holds every object's lock, until the fork is done: another
thread's new object waits in ``track()`` then, so none slips into the child uncounted.
(Not earlier: a thread that holds an object's lock may be making an object.)"""
_depth = 0
"""Forks nested in the forking thread (from a signal handler) do nothing of their own."""


def track(obj: Forkable) -> None:
    with _track_cond:
        while _forker is not None and _forker != threading.get_ident():
            _track_cond.wait()
        _live.add(obj)


def untrack(obj: Forkable) -> None:
    with _track_lock:  # never waits for a fork: an object gone cannot be inherited
        _live.discard(obj)


def _before() -> None:
    global _owner, _forker, _depth
    me = threading.get_ident()
    if _owner == me:
        _depth += 1
        return
    _fork_lock.acquire()
    _owner, _depth = me, 1
    while True:
        with _track_lock:
            taken = {id(obj) for obj, _ in _held}
            new = [obj for obj in _live if id(obj) not in taken]
            if not new:
                _forker = me
                return
        for obj in new:  # another thread may make objects while we take these locks
            # Take the lock and list the object for the after-fork hooks, which release
            # it, in C calls only: a signal handler's exception (which does not stop the
            # fork) comes before both or after both, never between.
            _held.extend(itertools.compress([(obj, None)], map(_ACQUIRE, [obj._lock])))
            if not obj.closed:
                try:
                    lifeline, keeper = os.pipe2(os.O_CLOEXEC)
                except OSError as e:  # EMFILE: the child gets no copies (_fork_child)
                    log.warning("no lifeline for %r across fork: %s", obj, e)
                    lifeline = -1
                else:
                    _held[-1] = (obj, (lifeline, keeper))
                obj._prepare_fork(lifeline)


def _done_forking() -> bool:
    """In an after-fork hook: False if this thread's fork is not the one to finish."""
    global _depth
    if _owner != threading.get_ident():
        return False  # our _before never got the fork lock
    if _depth > 1:
        _depth -= 1
        return False
    return True


def _after_in_parent() -> None:
    global _owner, _forker, _depth
    if not _done_forking():
        return
    while _held:  # every object is released, whatever one of them raises
        obj, pipe = _held.pop()
        try:
            if pipe is not None:
                os.close(pipe[1])
                os.set_blocking(pipe[0], False)
                obj._forked(pipe[0])
        except BaseException:  # a signal handler's too: the fork reports it and goes on,
            log.exception("after fork, in the parent: %r", obj)  # so the rest must too
        finally:
            obj._lock.release()
    with _track_cond:
        _forker = None
        _track_cond.notify_all()
    _owner, _depth = None, 0
    _fork_lock.release()


def _after_in_child() -> None:
    global _track_lock, _track_cond, _fork_lock, _owner, _forker, _depth
    done: list[int] = []  # (a list: made without a call, where a handler could come)
    """The objects that know they are a child's (by id)."""
    try:
        _child_objects(done)
    except BaseException:  # a signal handler's (the fork reports it and goes on): the
        _nested_child(skip=done)  # objects not done yet get no copies, as a nested child's
        log.exception("after fork, in the child")
    finally:
        while _held:  # stopped part way: what is left is let go all the same
            obj, pipe = _held.pop()
            for fd in pipe or ():
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(RuntimeError):
                obj._lock.release()
        _track_lock = threading.RLock()  # another thread may have held these at fork
        _track_cond = threading.Condition(_track_lock)
        _fork_lock = threading.RLock()
        _owner, _forker, _depth = None, None, 0


def _child_objects(done: list[int]) -> None:
    """The child's share of ``_after_in_child``: each object learns it is a child's, and
    keeps what was pinned for it (adding each to ``done``)."""
    views.renew_locks_after_fork()
    me = threading.get_ident()
    # Whether the before-fork hook prepared every object. A signal handler's exception
    # can stop it part way, or before it starts, and CPython forks all the same (it
    # reports a hook's exception): the objects it did not reach were not pinned, and
    # this child must not punch their pages as if it were the parent.
    prepared_all = _forker == me
    if _owner == me and _depth > 1:
        _nested_child()
    if not _done_forking():
        if _owner != me and not prepared_all:  # our hook never took the fork lock
            _nested_child()
        return
    failed = False
    while _held:
        obj, pipe = _held.pop()
        pinned = False
        try:
            if pipe is not None:
                os.close(pipe[0])
            if not obj.closed:
                pinned = obj._fork_child(pinned=pipe is not None)
            done.append(id(obj))
        except BaseException:  # a signal handler's too: the rest must be done all the same
            failed = True  # (it may have stopped before the object knew it is a child)
            pinned = pipe is not None  # keep what may be pinned: the safe side
            log.exception("after fork, in the child: %r", obj)
        finally:
            if pipe is not None:
                if pinned:
                    _lifelines.append(pipe[1])
                else:
                    with contextlib.suppress(OSError):  # what was pinned goes now
                        os.close(pipe[1])
            obj._lock.release()
    if failed or not prepared_all:
        _nested_child(skip=done)


def _nested_child(skip: list[int] | None = None) -> None:
    """In a child forked by a signal handler while another fork's hooks ran, or whose
    before-fork hook a handler's exception stopped: nothing was pinned for it, so every
    object (but those in ``skip``, by id: done already) drops its copies and knows it is
    a child (it would otherwise punch what its parent maps). Only this thread is left: no
    lock is taken."""
    for obj in list(_live):
        if skip and id(obj) in skip:
            continue
        try:
            if not obj.closed:
                obj._fork_child(pinned=False)
        except Exception:
            log.exception("after a nested fork, in the child: %r", obj)


os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
