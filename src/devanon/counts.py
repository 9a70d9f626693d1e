"""MapCounts: how many times each page of an Anon is mapped, kept as runs.

The RFC kept one counter per page "parallel to the swap entries" and walked them one by one
on every mmap and munmap. Here the counts are a step function: runs ``[start, stop)`` of
pages that share one count, split where a map or unmap begins or ends and merged again when
neighbours become equal (gVisor's segment sets in ``pkg/sentry/pgalloc`` do the same for
their reference counts). A map or unmap of any length costs two binary searches and at most
two insertions, so a 1 GiB range is as cheap as a page, and an unmapped TiB costs one run.
``benchmarks/core.py`` measures this against the per-page loop.

Runs live in two ``array('q')`` (16 bytes a run, no Python object per run), or, while
there are at most ``LIST_RUNS``, in two lists: the interpreter reads and writes a list's
items in place, where an array's go through the array module and are boxed each time (a
4 KiB map and unmap cycle: 5% less time, ``benchmarks/core.py``). Numpy works on the
arrays in place (a change spanning more runs than a list ever holds). Neighbouring runs
always differ in count: the set is kept maximally merged.

Runs lose where counts change at nearly every page (ubd-mmap laying single-page overlays
over a guest's memory: 1, 0, 1, 0, ...): 16 bytes a page. So a chunk of ``chunk_pages``
pages whose runs would take more memory than one byte per page becomes *dense*: a
per-page array of counts (the issue's "chunked per-page array"), standing in the runs
as one run whose count is ``-(chunk + 1)``, a sentinel no neighbour can equal. It turns back
into runs once few enough remain. Counts take a byte a page until one passes 255, then two,
then (past 65,535) four, or eight.
"""

from __future__ import annotations

import itertools
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import Any, TypeAlias

Dense = array
"""A dense chunk's per-page counts: ``array('B')``, widened to ``'H'`` or ``'I'`` as needed."""

PageRange = tuple[int, int]
"""A half-open range of page indices ``[start, stop)``."""

Runs: TypeAlias = "list[int] | array[int]"
"""The run starts, or their counts: lists while few, arrays beyond (see the module)."""

LIST_RUNS = 32
"""The most runs kept in lists: past it they turn into arrays, and back into lists at half.
Equal to ``_VECTOR_RUNS``, so that a change numpy makes always finds arrays."""

DENSE_CHUNK = 4096
"""Pages in a chunk that may turn dense (16 MiB of 4 KiB pages; 4 KiB of counts)."""
_RUN_BYTES = 16
"""Memory a run takes in arrays (two 8-byte items); in lists, up to three times that."""
_SLOT_BYTES = 8
"""A list's slot (a pointer)."""


class MapCounts:
    """Per-page map counts over ``npages`` pages, all starting at zero."""

    __slots__ = (
        "_chunk",
        "_counts",
        "_dense",
        "_densify_at",
        "_edges",
        "_grown_at",
        "_starts",
        "npages",
    )

    def __init__(self, npages: int, *, chunk_pages: int = DENSE_CHUNK) -> None:
        if npages <= 0:
            raise ValueError(f"npages must be positive, not {npages!r}")
        if chunk_pages < 2:
            raise ValueError(f"chunk_pages must be at least 2, not {chunk_pages!r}")
        self.npages = npages
        self._starts: Runs = [0]
        self._counts: Runs = [0]
        self._dense: dict[int, Dense[int]] = {}
        """Chunk index -> the per-page counts of a dense chunk."""
        self._edges: dict[int, int] = {}
        """Chunk index -> how many times the count changes inside that dense chunk."""
        self._chunk = chunk_pages
        self._densify_at = max(2, chunk_pages // _RUN_BYTES)
        """Runs in a chunk beyond which a byte per page takes less memory."""
        self._grown_at = min(self._densify_at, LIST_RUNS)
        """Runs beyond which a change that adds runs calls ``_grew``."""

    def count(self, page: int) -> int:
        """The count of one page."""
        self._check(page, page + 1)
        c = self._counts[bisect_right(self._starts, page) - 1]
        if c < 0:
            chunk = -c - 1
            return int(self._dense[chunk][page - chunk * self._chunk])
        return c

    def add(self, start: int, stop: int, n: int = 1) -> None:
        """Every page in ``[start, stop)`` gains ``n`` counts."""
        if type(n) is not int or n < 1:  # (the range: change)
            self._check(start, stop, n)
        self.change(start, stop, n)

    def remove(self, start: int, stop: int, n: int = 1) -> list[PageRange]:
        """Every page in ``[start, stop)`` loses ``n`` counts; returns the ranges now at zero.

        The ranges come sorted, ready to be punched. Raises ValueError, and changes
        nothing, if any page in the range has fewer than ``n`` counts to lose.
        """
        if type(n) is not int or n < 1:  # (the range: change)
            self._check(start, stop, n)
        return self.change(start, stop, -n)

    def change(self, start: int, stop: int, delta: int) -> list[PageRange]:
        """``add`` (``delta`` > 0) or ``remove`` (< 0) in one call; returns the ranges now
        at zero."""
        if type(start) is type(stop) is type(delta) is int:
            return self.change_ints(start, stop, delta)
        return self._change_spanning(start, stop, delta)  # which says what is wrong

    def change_ints(self, start: int, stop: int, delta: int) -> list[PageRange]:
        """``change`` for a caller whose three arguments are ints for sure (checked, or
        made by arithmetic on checked ints: Anon's map and unmap, the broker's objects);
        anything else may stop a change half made. The range is checked all the same.

        The hot path of a map and an unmap: the common case, a range that lies inside one
        run or is one, is done here without a further call (each call, and each check,
        costs a measurable share of a 4 KiB map)."""
        starts = self._starts
        k = bisect_right(starts, start) - 1
        nxt = k + 1
        before = len(starts)
        end = starts[nxt] if nxt < before else self.npages
        counts = self._counts
        old = counts[k]
        if not (0 <= start < stop <= end and old >= 0 and delta):
            # Out of range (``_check`` says so), spanning runs, or in a dense chunk.
            return self._change_spanning(start, stop, delta)
        new = old + delta
        if new < 0:
            raise ValueError(f"page {start} is not mapped {-delta} times (its count is {old})")
        zeros = [(start, stop)] if new == 0 else []
        right = nxt < before and counts[nxt] == new  # (meaningful where stop == end)
        if starts[k] == start:
            left = k > 0 and counts[k - 1] == new
            if stop == end:  # the whole run: no run added; neighbours may merge
                if left and right:
                    del starts[k : nxt + 1]
                    del counts[k : nxt + 1]
                elif left or right:
                    del starts[k if left else nxt]
                    del counts[k if left else nxt]
                    counts[k - 1 if left else k] = new
                else:
                    counts[k] = new
                    return zeros
                if before <= _BACK_TO_LISTS + 2 and type(starts) is not list:
                    self._settle()
                return zeros
            if left:  # the head joins the left neighbour: the run now starts at stop
                starts[k] = stop
            else:  # the head; the tail keeps the old count
                starts.insert(nxt, stop)
                counts.insert(nxt, old)
                counts[k] = new
        elif stop == end and right:  # the tail joins the right neighbour
            starts[nxt] = start
        else:
            if stop < end:  # the middle: a run at stop with the old count
                starts.insert(nxt, stop)
                counts.insert(nxt, old)
            starts.insert(nxt, start)  # the tail, or the middle, at the new count
            counts.insert(nxt, new)
        if len(starts) > self._grown_at:  # (a run added, or a boundary moved)
            self._grew(start, stop, k)
        return zeros

    def _grew(self, start: int, stop: int, k: int) -> None:
        """A change of ``[start, stop)`` added a run next to run ``k`` (the one that held
        ``start``), or moved a boundary there: the chunk may now be worth making dense (a
        run can tip only its own chunk, even where the runs in all are as many), and
        lists may have to become arrays."""
        if len(self._starts) > self._densify_at:
            size = self._chunk
            chunk = start // size
            if (stop - 1) // size != chunk:
                self._maybe_densify(start, stop)
            # Its first run inside is at most two after k (the change added runs next to
            # it); one more than d before k crowds the chunk however the search is cut.
            elif self._crowded(chunk, max(0, k - self._densify_at), k + 2):
                lo = chunk * size
                self._densify(chunk, lo, min(lo + size, self.npages))
        self._settle()

    def _crowded(self, chunk: int, lo: int = 0, hi: int | None = None) -> bool:
        """Whether ``chunk`` holds more runs than ``_densify_at``: the runs starting inside
        it, and the one it begins in. One binary search for its first run inside, among
        the runs ``[lo, hi)`` where the caller knows it lies (all of them by default)."""
        d, starts = self._densify_at, self._starts
        begin = chunk * self._chunk
        n = len(starts)
        first = bisect_right(starts, begin, lo, n if hi is None else min(hi, n))
        return first + d - 1 < n and starts[first + d - 1] < min(begin + self._chunk, self.npages)

    def _settle(self) -> None:
        """Lists past ``LIST_RUNS`` runs become arrays; arrays back at half, lists."""
        n = len(self._starts)
        if type(self._starts) is list:
            if n > LIST_RUNS:
                self._starts, self._counts = array("q", self._starts), array("q", self._counts)
        elif n <= _BACK_TO_LISTS:
            self._starts, self._counts = list(self._starts), list(self._counts)

    def _change_spanning(self, start: int, stop: int, delta: int) -> list[PageRange]:
        """``change`` of a range that spans runs or touches a dense chunk (or of a wrong
        one: ``_check`` names it)."""
        self._check(start, stop, delta if type(delta) is not int else abs(delta))
        if self._dense:
            zeros = self._apply_mixed(start, stop, delta)
        elif delta > 0:
            zeros = self._apply(start, stop, delta)
        else:
            zeros = self._remove_runs(start, stop, -delta)
        if len(self._starts) > self._densify_at:  # (runs added at an edge tip only its chunk)
            self._maybe_densify(start, stop)
        self._settle()
        return zeros

    def _remove_runs(self, start: int, stop: int, n: int) -> list[PageRange]:
        """``remove`` where no chunk is dense and the range spans runs."""
        starts, counts = self._starts, self._counts
        first = bisect_right(starts, start) - 1
        last = bisect_left(starts, stop)
        held = counts[first:last]
        if len(held) > _VECTOR_RUNS and isinstance(held, array):
            import numpy as np

            enough = int(np.frombuffer(held, dtype=np.int64).min()) >= n
        else:
            enough = min(held) >= n
        if enough:
            return self._apply(start, stop, -n)
        k = first + next(i for i, c in enumerate(held) if c < n)
        raise ValueError(
            f"page {max(start, starts[k])} is not mapped {n} times (its count is {counts[k]})"
        )

    def runs(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, int]]:
        """``(start, stop, count)`` for each run, clipped to ``[start, stop)``."""
        stop = self.npages if stop is None else stop
        self._check(start, stop)
        if not self._dense:
            yield from self._stored_runs(start, stop)
            return
        held: tuple[int, int, int] | None = None  # merged across a dense chunk's edges
        for a, b, c in self._stored_runs(start, stop):
            pieces = [(a, b, c)] if c >= 0 else self._dense_runs(-c - 1, a, b)
            for run in pieces:
                if held is None:
                    held = run
                elif held[2] == run[2]:
                    held = (held[0], run[1], run[2])
                else:
                    yield held
                    held = run
        if held is not None:
            yield held

    def runs_last_first(self, window: int) -> Iterator[tuple[int, int, int]]:
        """``(start, stop, count)`` for each run, the last first: a stored run whole, a
        dense chunk's runs ``window`` pages at a time. Costs in proportion to the runs,
        not to the pages. The counts must not change meanwhile."""
        starts, counts, stop = self._starts, self._counts, self.npages
        while stop > 0:
            k = bisect_right(starts, stop - 1) - 1
            c = counts[k]
            if c >= 0:
                yield starts[k], stop, c
                stop = starts[k]
            else:
                start = max(starts[k], stop - window)
                yield from reversed(self._dense_runs(-c - 1, start, stop))
                stop = start

    def dense_edges(self, start: int, stop: int) -> set[int]:
        """The chunks at the edges of ``[start, stop)`` that are dense (an add or remove
        of that range can make dense, or runs, only those: see ``compact``)."""
        return {c for c in self._edge_chunks(start, stop) if c in self._dense}

    def compact(self, start: int, stop: int, keep: set[int]) -> None:
        """After an ``add`` that undid a ``remove`` of ``[start, stop)``: the values are
        back, but the remove may have made a chunk at an edge dense. Those not in
        ``keep`` (``dense_edges`` before the remove) turn back into runs."""
        for chunk in self.dense_edges(start, stop) - keep:
            self._sparsify(chunk)
        self._settle()

    def _stored_runs(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """The stored runs clipped to ``[start, stop)`` (a dense chunk is one)."""
        starts, counts = self._starts, self._counts
        k = bisect_right(starts, start) - 1
        while k < len(starts) and starts[k] < stop:
            end = starts[k + 1] if k + 1 < len(starts) else self.npages
            yield max(start, starts[k]), min(stop, end), counts[k]
            k += 1

    def _dense_runs(self, chunk: int, start: int, stop: int) -> list[tuple[int, int, int]]:
        """The runs of dense ``chunk`` within ``[start, stop)``."""
        import numpy as np

        base = chunk * self._chunk
        part = _numpy(self._dense[chunk])[start - base : stop - base]
        cuts = (np.flatnonzero(part[1:] != part[:-1]) + 1).tolist()
        firsts = [0, *cuts]
        values = part[firsts].tolist()
        ends = [*cuts, len(part)]
        return [(start + a, start + b, v) for a, b, v in zip(firsts, ends, values, strict=True)]

    def zero_ranges(self, start: int = 0, stop: int | None = None) -> list[PageRange]:
        """The ranges in ``[start, stop)`` whose count is zero."""
        return [(a, b) for a, b, c in self.runs(start, stop) if c == 0]

    def mapped_pages(self) -> int:
        """How many pages have a count above zero."""
        total = sum(b - a for a, b, c in self._stored_runs(0, self.npages) if c > 0)
        if self._dense:
            import numpy as np

            total += sum(int(np.count_nonzero(_numpy(d))) for d in self._dense.values())
        return total

    def diff(self, other: MapCounts) -> list[tuple[int, int, int, int]]:
        """Where two count sets differ: ``(start, stop, ours, theirs)``, coalesced."""
        if other.npages != self.npages:
            raise ValueError(f"cannot compare {self.npages} pages with {other.npages}")
        bounds = sorted(
            {*(a for a, _, _ in self.runs()), *(a for a, _, _ in other.runs()), self.npages}
        )
        out: list[tuple[int, int, int, int]] = []
        for a, b in itertools.pairwise(bounds):
            ours, theirs = self.count(a), other.count(a)
            if ours == theirs:
                continue
            if out and out[-1][1] == a and out[-1][2:] == (ours, theirs):
                out[-1] = (out[-1][0], b, ours, theirs)
            else:
                out.append((a, b, ours, theirs))
        return out

    def nruns(self) -> int:
        """How many runs are stored (a dense chunk is one)."""
        return len(self._starts)

    def ndense(self) -> int:
        """How many chunks are dense (kept as per-page counts)."""
        return len(self._dense)

    def nbytes(self) -> int:
        """Memory the counts take, in bytes (the arrays' buffers, or the lists' slots and
        ints, and the dense chunks)."""
        return (
            _runs_bytes(self._starts)
            + _runs_bytes(self._counts)
            + sum(len(d) * d.itemsize for d in self._dense.values())
        )

    def _check(self, start: int, stop: int, n: int = 1) -> None:
        """Raise for a wrong range or count, naming it (before anything changes: an array
        takes no other number than an int, so a float found there would stop a change
        half made)."""
        for page in (start, stop):
            if type(page) is not int:
                raise TypeError(f"a page index is an int, not {page!r}")
        if not (0 <= start < stop <= self.npages):
            raise ValueError(
                f"page range [{start}, {stop}) is not a non-empty range within [0, {self.npages})"
            )
        if type(n) is not int:
            raise TypeError(f"a count changes by an int, not {n!r}")
        if n < 1:
            raise ValueError(f"a count changes by at least 1, not {n!r}")

    def _split(self, page: int) -> int:
        """Make ``page`` the start of a run; returns that run's index."""
        starts = self._starts
        if page == self.npages:
            return len(starts)
        k = bisect_right(starts, page) - 1
        if starts[k] == page:
            return k
        starts.insert(k + 1, page)
        self._counts.insert(k + 1, self._counts[k])
        return k + 1

    def _apply(self, start: int, stop: int, delta: int) -> list[PageRange]:
        first = self._split(start)
        last = self._split(stop)
        starts, counts = self._starts, self._counts
        if last - first > _VECTOR_RUNS and isinstance(counts, array):
            zeros = _apply_vectorized(starts, counts, first, last, delta, self.npages)
        else:
            zeros = []
            for k in range(first, last):
                c = counts[k] = counts[k] + delta
                if c == 0:
                    zeros.append((starts[k], starts[k + 1] if k + 1 < len(starts) else self.npages))
        # Runs inside the range stay distinct (all moved by the same delta); only the two
        # edges may now equal their outside neighbours.
        self._merge_edges(first, last)
        return zeros

    def _merge_edges(self, first: int, last: int) -> None:
        """Merge runs ``first`` and ``last`` (the first run past a changed stretch) with
        their left neighbours if the counts are equal. The right edge first, so that
        ``first`` still indexes the same run."""
        starts, counts = self._starts, self._counts
        if last < len(starts) and counts[last] == counts[last - 1]:
            del starts[last]
            del counts[last]
        if first > 0 and counts[first] == counts[first - 1]:
            del starts[first]
            del counts[first]

    # -- dense chunks ------------------------------------------------------------------

    def _apply_mixed(self, start: int, stop: int, delta: int) -> list[PageRange]:
        """``[start, stop)`` gains ``delta`` where some chunk is dense: split the range into
        dense parts and stretches of runs, check them all (a remove changes nothing unless
        every page has enough), then apply. Returns the ranges now at zero, coalesced."""
        c = self._counts[bisect_right(self._starts, start) - 1]
        if c < 0 and stop <= (-c) * self._chunk:  # the common case: inside one dense chunk
            pieces = [(start, stop, -c - 1)]
        else:
            pieces = self._pieces(start, stop)
        if delta < 0:
            for a, b, chunk in pieces:
                low = self._lowest(a, b, chunk)
                if low[1] < -delta:
                    raise ValueError(
                        f"page {low[0]} is not mapped {-delta} times (its count is {low[1]})"
                    )
        zeros: list[PageRange] = []
        for a, b, chunk in pieces:
            if chunk < 0:
                zeros += self._apply(a, b, delta)
            else:
                zeros += self._dense_apply(chunk, a, b, delta)
        out: list[PageRange] = []
        for a, b in zeros:  # a stretch may end where a dense chunk's zeros begin
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(a, b, chunk)`` covering ``[start, stop)``: chunk -1 for a stretch of runs."""
        starts, counts, size = self._starts, self._counts, self._chunk
        first = bisect_right(starts, start) - 1
        last = bisect_left(starts, stop)
        out: list[tuple[int, int, int]] = []
        pos = start
        for k in _negative(counts, first, last):
            chunk = -counts[k] - 1
            a = max(start, chunk * size)
            b = min(stop, chunk * size + size, self.npages)
            if pos < a:
                out.append((pos, a, -1))
            out.append((a, b, chunk))
            pos = b
        if pos < stop:
            out.append((pos, stop, -1))
        return out

    def _lowest(self, start: int, stop: int, chunk: int) -> tuple[int, int]:
        """``(page, count)`` of the lowest count in a piece (the first such page)."""
        if chunk >= 0:
            base = chunk * self._chunk
            dense = self._dense[chunk]
            if stop - start <= _VECTOR_RUNS:
                low = min(dense[start - base : stop - base])
                return base + dense.index(low, start - base, stop - base), low
            part = _numpy(dense)[start - base : stop - base]
            i = int(part.argmin())
            return start + i, int(part[i])
        starts, counts = self._starts, self._counts
        first = bisect_right(starts, start) - 1
        last = bisect_left(starts, stop)
        if last - first > _VECTOR_RUNS and isinstance(counts, array):
            import numpy as np

            k = first + int(np.frombuffer(counts, dtype=np.int64)[first:last].argmin())
        else:
            k = min(range(first, last), key=counts.__getitem__)
        return max(start, starts[k]), counts[k]

    def _dense_apply(self, chunk: int, start: int, stop: int, delta: int) -> list[PageRange]:
        """A checked change to part of a dense chunk; the ranges now at zero."""
        base = chunk * self._chunk
        dense = self._dense[chunk]
        i, j = start - base, stop - base
        edges = self._edges[chunk] - _changes_at(dense, i, j)  # inside, nothing changes
        small = j - i <= _VECTOR_RUNS
        high = (max(dense[i:j]) if small else int(_numpy(dense)[i:j].max())) if delta > 0 else 0
        if high + delta > _MAX[dense.typecode]:
            dense = self._dense[chunk] = array(_code_for(high + delta), dense)  # wider
        zeros: list[PageRange] = []
        if small:
            for x in range(i, j):
                c = dense[x] = dense[x] + delta
                if c == 0:
                    if zeros and zeros[-1][1] == base + x:
                        zeros[-1] = (zeros[-1][0], base + x + 1)
                    else:
                        zeros.append((base + x, base + x + 1))
        else:
            zeros = _numpy_apply(dense, i, j, delta, base)
        edges = self._edges[chunk] = edges + _changes_at(dense, i, j)
        if edges < max(1, self._densify_at // 4):
            self._sparsify(chunk)  # few runs left: they take less memory again
        return zeros

    def _maybe_densify(self, start: int, stop: int) -> None:
        """Make the chunks at the edges of a range dense if their runs grew too many (an
        add or remove makes new runs only where its range begins and ends)."""
        size = self._chunk
        for chunk in self._edge_chunks(start, stop):
            if chunk not in self._dense and self._crowded(chunk):
                self._densify(chunk, chunk * size, min(chunk * size + size, self.npages))

    def _edge_chunks(self, start: int, stop: int) -> set[int]:
        """The chunks ``[start, stop)`` begins and ends in (one, or two)."""
        return {start // self._chunk, (stop - 1) // self._chunk}

    def _densify(self, chunk: int, lo: int, hi: int) -> None:
        import numpy as np

        runs = list(self._stored_runs(lo, hi))
        values = [c for _, _, c in runs]
        code = _code_for(max(values))
        dense = array(code)
        dense.frombytes(
            np.repeat(np.array(values, dtype=code), [b - a for a, b, _ in runs]).tobytes()
        )
        starts, counts = self._starts, self._counts
        k = self._split(lo)
        end = self._split(hi)
        del starts[k + 1 : end]
        del counts[k + 1 : end]
        counts[k] = -chunk - 1
        self._dense[chunk] = dense
        self._edges[chunk] = len(runs) - 1

    def _sparsify(self, chunk: int) -> None:
        """A dense chunk back to runs, merged with its neighbours."""
        lo = chunk * self._chunk
        runs = self._dense_runs(chunk, lo, lo + len(self._dense[chunk]))
        del self._dense[chunk]
        del self._edges[chunk]
        starts, counts = self._starts, self._counts
        k = bisect_left(starts, lo)
        _splice(starts, k, [a for a, _, _ in runs])
        _splice(counts, k, [c for _, _, c in runs])
        self._merge_edges(k, k + len(runs))


_VECTOR_RUNS = LIST_RUNS
"""Ranges spanning more runs than this are updated by numpy, not a Python loop."""
_BACK_TO_LISTS = LIST_RUNS // 2
"""Arrays of this many runs or fewer turn back into lists."""


def _splice(runs: Runs, k: int, values: list[int]) -> None:
    """``runs[k : k + 1] = values``, in the runs' own kind."""
    if isinstance(runs, array):
        runs[k : k + 1] = array("q", values)
    else:
        runs[k : k + 1] = values


def _runs_bytes(runs: Runs) -> int:
    """Memory one of the two run sequences takes: an array's items, or a list's slots and
    its own ints (those from -5 to 256 are the interpreter's, shared). What the runs are
    decides it, not how they came to be (a list's spare slots are left out, as an
    array's are)."""
    if isinstance(runs, array):
        return len(runs) * runs.itemsize
    return _SLOT_BYTES * len(runs) + sum(sys.getsizeof(x) for x in runs if not -5 <= x <= 256)


_MAX = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFF_FFFF, "Q": 0xFFFF_FFFF_FFFF_FFFF}
"""The largest count each kind of dense chunk holds."""


def _code_for(count: int) -> str:
    """The narrowest array type that holds ``count``."""
    return next(code for code, top in _MAX.items() if count <= top)


def _numpy(dense: Dense[int]) -> Any:
    """A numpy view of a dense chunk (it never resizes: nothing stops the export)."""
    import numpy as np

    return np.frombuffer(dense, dtype=dense.typecode)


def _numpy_apply(dense: Dense[int], i: int, j: int, delta: int, base: int) -> list[PageRange]:
    """``dense[i:j] += delta`` in C (counts checked already); the ranges now at zero."""
    import numpy as np

    part = _numpy(dense)[i:j]
    if delta > 0:
        part += delta
        return []
    part -= -delta
    hit = np.flatnonzero(part == 0)
    if not hit.size:
        return []
    cuts = np.flatnonzero(np.diff(hit) != 1)
    firsts = hit[np.concatenate(([0], cuts + 1))].tolist()
    lasts = hit[np.concatenate((cuts, [hit.size - 1]))].tolist()
    return [(base + i + a, base + i + b + 1) for a, b in zip(firsts, lasts, strict=True)]


def _changes_at(dense: Dense[int], i: int, j: int) -> int:
    """How many of the two edges of ``dense[i:j]`` are places where the count changes."""
    left = i > 0 and dense[i - 1] != dense[i]
    right = j < len(dense) and dense[j - 1] != dense[j]
    return int(left) + int(right)


def _negative(counts: Runs, first: int, last: int) -> list[int]:
    """Indices in ``[first, last)`` of the runs that stand for dense chunks."""
    if last - first <= _VECTOR_RUNS or not isinstance(counts, array):
        return [k for k in range(first, last) if counts[k] < 0]
    import numpy as np

    view = np.frombuffer(counts, dtype=np.int64)[first:last]
    found: list[int] = (np.flatnonzero(view < 0) + first).tolist()
    return found


def _apply_vectorized(
    starts: Runs, counts: array[int], first: int, last: int, delta: int, npages: int
) -> list[PageRange]:
    """``counts[first:last] += delta`` in C; returns the runs that reached zero.

    The numpy views borrow the arrays' buffers; they are dropped before the caller
    resizes the arrays again (an array refuses to resize while a buffer is exported).
    """
    import numpy as np  # only paid for by big, fragmented ranges

    assert isinstance(starts, array)  # (as counts: more than LIST_RUNS runs)

    view = np.frombuffer(counts, dtype=np.int64)[first:last]
    view += delta
    if delta > 0:
        return []
    hit = np.flatnonzero(view == 0) + first
    begins = np.frombuffer(starts, dtype=np.int64)
    ends = np.where(hit + 1 < len(begins), begins[np.minimum(hit + 1, len(begins) - 1)], npages)
    return list(zip(begins[hit].tolist(), ends.tolist(), strict=True))
