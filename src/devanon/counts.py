"""MapCounts: how many times each page of an Anon is mapped, kept as runs.

The RFC kept one counter per page "parallel to the swap entries" and walked them one by one
on every mmap and munmap. Here the counts are a step function: runs ``[start, stop)`` of
pages that share one count, split where a map or unmap begins or ends and merged again when
neighbours become equal (gVisor's segment sets in ``pkg/sentry/pgalloc`` do the same for
their reference counts). A map or unmap of any length costs two binary searches and at most
two insertions, so a 1 GiB range is as cheap as a page, and an unmapped TiB costs one run.
``benchmarks/core.py`` measures this against the per-page loop.

Runs live in two ``array('q')`` (16 bytes a run, no Python object per run). Neighbouring
runs always differ in count: the set is kept maximally merged.
"""

from __future__ import annotations

import itertools
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator

PageRange = tuple[int, int]
"""A half-open range of page indices ``[start, stop)``."""


class MapCounts:
    """Per-page map counts over ``npages`` pages, all starting at zero."""

    __slots__ = ("_counts", "_starts", "npages")

    def __init__(self, npages: int) -> None:
        if npages <= 0:
            raise ValueError(f"npages must be positive, not {npages!r}")
        self.npages = npages
        self._starts = array("q", [0])
        self._counts = array("q", [0])

    def count(self, page: int) -> int:
        """The count of one page."""
        self._check(page, page + 1)
        return self._counts[bisect_right(self._starts, page) - 1]

    def add(self, start: int, stop: int, n: int = 1) -> None:
        """Every page in ``[start, stop)`` gains ``n`` counts."""
        if not 0 <= start < stop <= self.npages:
            self._check(start, stop)
        if self._apply_in_run(start, stop, n) is None:
            self._apply(start, stop, n)

    def remove(self, start: int, stop: int, n: int = 1) -> list[PageRange]:
        """Every page in ``[start, stop)`` loses ``n`` counts; returns the ranges now at zero.

        The ranges come sorted, ready to be punched. Raises ValueError, and changes
        nothing, if any page in the range has fewer than ``n`` counts to lose.
        """
        if not 0 <= start < stop <= self.npages:
            self._check(start, stop)
        zeros = self._apply_in_run(start, stop, -n)
        if zeros is not None:
            return zeros
        starts, counts = self._starts, self._counts
        first = bisect_right(starts, start) - 1
        last = bisect_left(starts, stop)
        held = counts[first:last]
        if len(held) > _VECTOR_RUNS:
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
        starts, counts = self._starts, self._counts
        k = bisect_right(starts, start) - 1
        while k < len(starts) and starts[k] < stop:
            end = starts[k + 1] if k + 1 < len(starts) else self.npages
            yield max(start, starts[k]), min(stop, end), counts[k]
            k += 1

    def zero_ranges(self, start: int = 0, stop: int | None = None) -> list[PageRange]:
        """The ranges in ``[start, stop)`` whose count is zero."""
        return [(a, b) for a, b, c in self.runs(start, stop) if c == 0]

    def mapped_pages(self) -> int:
        """How many pages have a count above zero."""
        return sum(b - a for a, b, c in self.runs() if c > 0)

    def diff(self, other: MapCounts) -> list[tuple[int, int, int, int]]:
        """Where two count sets differ: ``(start, stop, ours, theirs)``, coalesced."""
        if other.npages != self.npages:
            raise ValueError(f"cannot compare {self.npages} pages with {other.npages}")
        bounds = sorted({*self._starts, *other._starts, self.npages})
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
        """How many runs the counts take."""
        return len(self._starts)

    def nbytes(self) -> int:
        """Memory the runs take, in bytes (the arrays' buffers)."""
        return (
            self._starts.buffer_info()[1] * self._starts.itemsize
            + self._counts.buffer_info()[1] * self._counts.itemsize
        )

    def _check(self, start: int, stop: int) -> None:
        if not (0 <= start < stop <= self.npages):
            raise ValueError(
                f"page range [{start}, {stop}) is not a non-empty range within [0, {self.npages})"
            )

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

    def _apply_in_run(self, start: int, stop: int, delta: int) -> list[PageRange] | None:
        """The common cases, kept short: ``[start, stop)`` lies inside one run, or is one.

        Returns None (changing nothing) when the range spans runs. Raises ValueError
        (changing nothing) if a count would fall below zero.
        """
        starts, counts = self._starts, self._counts
        k = bisect_right(starts, start) - 1
        nxt = k + 1
        end = starts[nxt] if nxt < len(starts) else self.npages
        if stop > end:
            return None
        old = counts[k]
        new = old + delta
        if new < 0:
            raise ValueError(f"page {start} is not mapped {-delta} times (its count is {old})")
        zeros = [(start, stop)] if new == 0 else []
        inner_left = starts[k] < start
        if stop < end:  # a new run starts at stop, with the old count
            starts.insert(nxt, stop)
            counts.insert(nxt, old)
        elif nxt < len(starts) and counts[nxt] == new:  # merge with the right neighbour
            del starts[nxt]
            del counts[nxt]
        if inner_left:  # a new run starts at start, with the new count
            starts.insert(nxt, start)
            counts.insert(nxt, new)
        else:
            counts[k] = new
            if k > 0 and counts[k - 1] == new:  # merge with the left neighbour
                del starts[k]
                del counts[k]
        return zeros

    def _apply(self, start: int, stop: int, delta: int) -> list[PageRange]:
        first = self._split(start)
        last = self._split(stop)
        starts, counts = self._starts, self._counts
        if last - first > _VECTOR_RUNS:
            zeros = _apply_vectorized(starts, counts, first, last, delta, self.npages)
        else:
            zeros = []
            for k in range(first, last):
                c = counts[k] = counts[k] + delta
                if c == 0:
                    zeros.append((starts[k], starts[k + 1] if k + 1 < len(starts) else self.npages))
        # Runs inside the range stay distinct (all moved by the same delta); only the two
        # edges may now equal their outside neighbours. The right edge first, so that
        # ``first`` still indexes the same run.
        if last < len(starts) and counts[last] == counts[last - 1]:
            del starts[last]
            del counts[last]
        if first > 0 and counts[first] == counts[first - 1]:
            del starts[first]
            del counts[first]
        return zeros


_VECTOR_RUNS = 32
"""Ranges spanning more runs than this are updated by numpy, not a Python loop."""


def _apply_vectorized(
    starts: array[int], counts: array[int], first: int, last: int, delta: int, npages: int
) -> list[PageRange]:
    """``counts[first:last] += delta`` in C; returns the runs that reached zero.

    The numpy views borrow the arrays' buffers; they are dropped before the caller
    resizes the arrays again (an array refuses to resize while a buffer is exported).
    """
    import numpy as np  # only paid for by big, fragmented ranges

    view = np.frombuffer(counts, dtype=np.int64)[first:last]
    view += delta
    if delta > 0:
        return []
    hit = np.flatnonzero(view == 0) + first
    begins = np.frombuffer(starts, dtype=np.int64)
    ends = np.where(hit + 1 < len(begins), begins[np.minimum(hit + 1, len(begins) - 1)], npages)
    return list(zip(begins[hit].tolist(), ends.tolist(), strict=True))
