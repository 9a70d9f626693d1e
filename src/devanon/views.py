"""Views of mapped memory that cannot outlive it.

A memoryview over raw memory carries a bare pointer: if the memory under it is unmapped, the
next access kills the interpreter with SIGSEGV, and if something else is mapped there later,
it silently reads and writes *that*. devanon's rule (DESIGN invariant 5): while any view of a
mapping is alive, unmapping a piece of it does not give the address range back to the kernel.
The piece is replaced, atomically with ``MAP_FIXED``, by private anonymous zero memory (the
"quarantine"): stale views read zeros, stale writes land in that scratch memory, never in
the Anon or in another mapping. When the last view dies, the quarantined ranges are unmapped.

Each ``view()`` exports the buffer of a fresh ctypes array; memoryviews and numpy arrays made
from it keep that array alive, so ``weakref.finalize`` on the array tells when the last of
them is gone.
"""

from __future__ import annotations

import threading
import weakref

from devanon import _libc


class ViewTracker:
    """Counts the live views of one mapping and holds its quarantined ranges."""

    __slots__ = ("__weakref__", "_lock", "_pending", "live", "writers")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pending: list[tuple[int, int]] = []
        self.live = 0
        self.writers = 0
        """Live views that can write."""
        _trackers.add(self)

    def view(self, address: int, length: int, *, readonly: bool) -> memoryview:
        """A memoryview of ``[address, address+length)``, tracked until it dies."""
        array = _libc.memory_at(address, length)
        with self._lock:
            self.live += 1
            self.writers += not readonly
        # Not at exit: atexit runs finalizers of views still alive (a handler registered
        # earlier may read one later), and the quarantine must outlast them all.
        weakref.finalize(array, self._view_died, not readonly).atexit = False
        view = memoryview(array).cast("B")
        return view.toreadonly() if readonly else view

    def hold(self, address: int, length: int) -> bool:
        """Keep a range already quarantined (``quarantine``) until the last view dies;
        False, keeping nothing, if no view is alive (the caller unmaps it itself)."""
        with self._lock:
            if self.live == 0:
                return False
            self._pending.append((address, length))
            return True

    def retire(self, address: int, length: int) -> bool:
        """Quarantine ``[address, address+length)`` if views are alive; else do nothing.

        Returns True if the range was quarantined (the caller must not munmap it), False if
        no view is alive (the caller unmaps it itself). Raises OSError if the quarantine
        mapping cannot be made; then nothing changed.
        """
        with self._lock:
            if self.live == 0:
                return False
            quarantine(address, length)
            if not self.hold(address, length):  # the last view died meanwhile (the GC)
                self._unmap([(address, length)])
            return True

    def _view_died(self, writer: bool) -> None:
        with self._lock:
            self.live -= 1
            self.writers -= writer
            if self.live:
                return
            pending, self._pending = self._pending, []
        self._unmap(pending)

    def _unmap(self, pending: list[tuple[int, int]]) -> None:
        """Unmap quarantined ranges, taken from ``_pending`` when no view was left."""
        for address, length in pending:
            try:
                _libc.munmap(address, length)
            except OSError:  # pragma: no cover - only ENOMEM at max_map_count; keep it reserved
                with self._lock:
                    self._pending.append((address, length))


def quarantine(address: int, length: int) -> None:
    """Replace ``[address, address+length)``, in one call, with private zero memory that
    nothing else can be mapped over (MAP_FIXED); OSError, changing nothing, if the kernel
    refuses (ENOMEM at vm.max_map_count)."""
    _libc.mmap(
        address,
        length,
        _libc.PROT_READ | _libc.PROT_WRITE,
        _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS | _libc.MAP_FIXED | _libc.MAP_NORESERVE,
        -1,
        0,
    )


_trackers: weakref.WeakSet[ViewTracker] = weakref.WeakSet()


def renew_locks_after_fork() -> None:
    """In a forked child, first thing: a thread that held a tracker's lock at fork is not
    in the child, so every tracker gets a fresh lock (``devanon.forking`` calls this before
    its own hooks need them). At worst that thread was between two steps of
    ``_view_died``; then a quarantined range stays reserved in the child."""
    for tracker in list(_trackers):
        tracker._lock = threading.RLock()
