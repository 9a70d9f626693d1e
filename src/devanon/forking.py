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
- A child of an ``Anon`` never punches, and may not map pages of it either: it cannot
  know what its parent (or a sibling) maps, nor tell them what it maps. It uses and unmaps
  what it inherited. Processes that share memory as equals use the broker, which counts
  for all.

The hooks hold every tracked object's lock across fork(), so no child inherits half-updated
books.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Protocol

from devanon.counts import MapCounts, PageRange


class Forkable(Protocol):
    """What the fork hooks need of an object (Anon, broker.SharedAnon)."""

    _lock: threading.RLock

    @property
    def closed(self) -> bool: ...

    def _prepare_fork(self) -> None:
        """In the parent, just before fork: keep uninherited mappings from the child."""

    def _forked(self, lifeline: int) -> None:
        """In the parent, after fork: pin what the child inherited; owns ``lifeline``."""

    def _fork_child(self) -> None:
        """In the child, after fork: drop what the child did not inherit."""


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
_lifelines: list[int] = []
"""In a child: the write ends that tell each ancestor's objects we are alive."""


_track_lock = threading.Lock()
"""Held while the set changes or is read, and from the moment every object's lock is taken
until the fork is done, so that no object made meanwhile by another thread slips through
uncounted. Never held while waiting for an object's lock."""


def track(obj: Forkable) -> None:
    with _track_lock:
        _live.add(obj)


def untrack(obj: Forkable) -> None:
    with _track_lock:
        _live.discard(obj)


def _before() -> None:
    taken: set[int] = set()
    while True:
        _track_lock.acquire()
        new = [obj for obj in _live if id(obj) not in taken]
        if not new:
            return  # _track_lock stays held: released once the fork is done
        _track_lock.release()
        try:
            for obj in new:  # made by another thread while we took the others' locks
                obj._lock.acquire()
                taken.add(id(obj))
                _held.append((obj, None if obj.closed else os.pipe2(os.O_CLOEXEC)))
                if not obj.closed:
                    obj._prepare_fork()
        except BaseException:
            _track_lock.acquire()  # the after-fork hooks release it, whatever happened
            raise


def _after_in_parent() -> None:
    while _held:  # every object is released, whatever one of them raises
        obj, pipe = _held.pop()
        try:
            if pipe is not None:
                os.close(pipe[1])
                os.set_blocking(pipe[0], False)
                obj._forked(pipe[0])
        except Exception:
            log.exception("after fork, in the parent: %r", obj)
        finally:
            obj._lock.release()
    _track_lock.release()


def _after_in_child() -> None:
    while _held:
        obj, pipe = _held.pop()
        try:
            if pipe is not None:
                os.close(pipe[0])
                _lifelines.append(pipe[1])
                obj._fork_child()
        except Exception:
            log.exception("after fork, in the child: %r", obj)
        finally:
            obj._lock.release()
    global _track_lock
    _track_lock = threading.Lock()  # another thread may have held it at fork


os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
