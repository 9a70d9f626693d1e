"""fork(): children keep counted pages alive, and never punch what a parent may still use.

The 2004 patch counted only at mmap time: fork copied the mappings without a count, so a
child's exit could free pages its parent still used. Here:

- A mapping is not inherited (MADV_DONTFORK) unless it was made with ``inherit=True``; the
  child's copy of the Anon forgets those mappings.
- For inherited mappings, the parent pins their pages with one more count per child, and
  keeps the read end of a pipe whose write end only the child (and its own children) hold.
  The write end closes exactly when no descendant can map the pages any more: at exit, or
  at exec (it is close-on-exec, and exec drops mappings too). The parent notices EOF at its
  next call, drops the pins, and punches every page left with no count, including pages the
  child mapped and wrote on its own.
- A child never punches: it cannot know what its parent (or a sibling) maps. Its pages go
  back to the host when its parent sweeps after it is gone. For processes that share an
  Anon as equals, use the broker, which counts for all of them.

The hooks hold every Anon's lock across fork(), so no child inherits half-updated books.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from devanon.counts import MapCounts, PageRange

if TYPE_CHECKING:
    from devanon.anon import Anon


@dataclass(slots=True)
class _Child:
    lifeline: int
    """Read end of the pipe: EOF once the child and its descendants are gone."""
    pins: list[PageRange]


@dataclass(slots=True)
class ForkState:
    """One Anon's view of fork: its children's pins, or the fact that it is a child."""

    children: list[_Child] = field(default_factory=list)
    is_child: bool = False
    lifelines: list[int] = field(default_factory=list)
    """In a child: the write ends that tell each ancestor we are alive."""
    pipe: tuple[int, int] | None = None

    def reap(self, counts: MapCounts) -> bool:
        """Drop the pins of children that are gone; True if any was."""
        gone = False
        for child in list(self.children):
            try:
                alive = os.read(child.lifeline, 1) != b""
            except BlockingIOError:
                alive = True
            if alive:
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
        for fd in self.lifelines:
            os.close(fd)
        self.lifelines.clear()


_live: weakref.WeakSet[Anon] = weakref.WeakSet()
_held: list[Anon] = []


def track(anon: Anon) -> None:
    _live.add(anon)


def untrack(anon: Anon) -> None:
    _live.discard(anon)


def _before() -> None:
    for anon in list(_live):
        anon._lock.acquire()
        _held.append(anon)
        if not anon.closed:
            anon._fork.pipe = os.pipe2(os.O_CLOEXEC)


def _after_in_parent() -> None:
    while _held:
        anon = _held.pop()
        state = anon._fork
        if state.pipe is not None:
            read_end, write_end = state.pipe
            state.pipe = None
            os.close(write_end)
            os.set_blocking(read_end, False)
            state.children.append(_Child(read_end, anon._fork_parent()))
        anon._lock.release()


def _after_in_child() -> None:
    while _held:
        anon = _held.pop()
        state = anon._fork
        if state.pipe is not None:
            read_end, write_end = state.pipe
            state.pipe = None
            os.close(read_end)
            for child in state.children:  # the parent's other children are not ours
                os.close(child.lifeline)
            state.children.clear()
            state.lifelines.append(write_end)
            state.is_child = True
            anon._fork_child()
        anon._lock.release()


os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
