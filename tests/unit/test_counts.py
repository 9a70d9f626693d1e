"""MapCounts against a plain model, over random add/remove sequences in a 1 TiB space.

2**28 pages of 4 KiB cannot be enumerated, so the model is the multiset of ranges that are
added now: a page's count is how many of them contain it (``model_count``). Counts form a
step function that can only change at a range's boundary, so evaluating the model at every
boundary gives all of it (``model_runs``). After every step the whole of
``MapCounts.runs()`` is compared with that, along with ``count()`` at every page a step
touched and its neighbours.

``fragment`` lays down many small ranges at once, so that later adds and removes span more
than ``counts._VECTOR_RUNS`` runs and take the numpy path.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import re

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from devanon import counts as counts_module
from devanon.counts import LIST_RUNS, MapCounts

NPAGES = 2**28  # 1 TiB of 4 KiB pages

Range = tuple[int, int]

# Boundaries from a few small clusters collide often (overlaps, shared edges, neighbours),
# plus anywhere in the space and its very ends.
points = st.one_of(
    st.integers(0, 40),
    st.integers(NPAGES // 2 - 20, NPAGES // 2 + 20),
    st.integers(NPAGES - 40, NPAGES),
    st.integers(0, NPAGES),
)
pages = points.map(lambda p: min(p, NPAGES - 1))
times = st.sampled_from([1, 1, 1, 2, 3])


def _as_range(ends: tuple[int, int]) -> Range:
    a, b = sorted(ends)
    if a == b:  # empty: widen by one page, inside the space
        return (a, a + 1) if a < NPAGES else (a - 1, a)
    return a, b


ranges = st.tuples(points, points).map(_as_range)


def model_count(intervals: list[Range], page: int) -> int:
    return sum(a <= page < b for a, b in intervals)


def model_runs(intervals: list[Range]) -> list[tuple[int, int, int]]:
    """``(start, stop, count)`` over the whole space, maximally merged.

    A sweep: the count steps up by one at each range's start and down at its stop.
    """
    steps = collections.Counter[int]()
    for a, b in intervals:
        steps[a] += 1
        steps[b] -= 1
    cuts = sorted({0, NPAGES, *steps})
    runs: list[tuple[int, int, int]] = []
    c = 0
    for a, b in itertools.pairwise(cuts):
        c += steps[a]
        if runs and runs[-1][2] == c:
            runs[-1] = (runs[-1][0], b, c)
        else:
            runs.append((a, b, c))
    return runs


def model_zeros(intervals: list[Range], start: int, stop: int) -> list[Range]:
    """The pages of ``[start, stop)`` with count 0, coalesced and sorted."""
    out: list[Range] = []
    for a, b, c in model_runs(intervals):
        a, b = max(a, start), min(b, stop)
        if c == 0 and a < b:
            out.append((a, b))
    return out


class CountsMachine(RuleBasedStateMachine):
    chunk_pages = counts_module.DENSE_CHUNK

    def __init__(self) -> None:
        super().__init__()
        self.counts = MapCounts(NPAGES, chunk_pages=self.chunk_pages)
        self.intervals: list[Range] = []  # added now, a multiset (n counts: n copies)
        self.probes: set[int] = {0, NPAGES - 1}

    # -- the model -----------------------------------------------------------------------

    def _take(self, start: int, stop: int) -> None:
        """One count less on every page of ``[start, stop)``: at each position, cut the
        part that covers it out of one added range (any one: counts only see how many)."""
        pos = start
        while pos < stop:
            k = next(i for i, (a, b) in enumerate(self.intervals) if a <= pos < b)
            a, b = self.intervals.pop(k)
            end = min(b, stop)
            if a < pos:
                self.intervals.append((a, pos))
            if end < b:
                self.intervals.append((end, b))
            pos = end

    def _touch(self, start: int, stop: int) -> None:
        self.probes.update((start, stop - 1, max(0, start - 1), min(NPAGES - 1, stop)))

    def _add(self, start: int, stop: int, n: int) -> None:
        runs_spanned = len(list(self.counts.runs(start, stop)))
        if runs_spanned > counts_module._VECTOR_RUNS:
            event("add spans enough runs for the numpy path")
        self.counts.add(start, stop, n)
        self.intervals += [(start, stop)] * n
        self._touch(start, stop)

    def _remove(self, start: int, stop: int, n: int = 1) -> None:
        """A remove that must succeed: returns exactly the pages that fell to zero."""
        runs_spanned = len(list(self.counts.runs(start, stop)))
        if runs_spanned > counts_module._VECTOR_RUNS:
            event("remove spans enough runs for the numpy path")
        zeros = self.counts.remove(start, stop, n)
        for _ in range(n):
            self._take(start, stop)
        expected = model_zeros(self.intervals, start, stop)
        assert zeros == expected
        if len(zeros) > 1:
            event("remove returned several zero ranges")
        self._touch(start, stop)

    def _mapped_stretches(self, at_least: int) -> list[Range]:
        """Maximal ranges whose every page has a count of at least ``at_least``."""
        out: list[Range] = []
        for a, b, c in model_runs(self.intervals):
            if c < at_least:
                continue
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out

    # -- rules ---------------------------------------------------------------------------

    @initialize(r=ranges)
    def first(self, r: Range) -> None:
        self._add(*r, 1)

    @rule(r=ranges, n=times)
    def add(self, r: Range, n: int) -> None:
        self._add(*r, n)

    @rule(base=points, k=st.integers(17, 40), gap=st.integers(1, 3))
    def fragment(self, base: int, k: int, gap: int) -> None:
        """A covering range, then ``k`` small ranges on it: up to 2k+1 runs."""
        base = min(base, NPAGES - k * (gap + 1))
        self._add(base, base + k * (gap + 1), 1)
        for i in range(k):
            self._add(base + i * (gap + 1), base + i * (gap + 1) + 1 + (i % 2) * (gap > 1), 1)

    @precondition(lambda self: self.intervals)
    @rule(data=st.data(), n=times)
    def remove_inside_a_mapped_stretch(self, data: st.DataObject, n: int) -> None:
        """Remove a sub-range of a stretch whose pages all have ``n`` counts (may span runs)."""
        stretches = self._mapped_stretches(n)
        if not stretches:
            n, stretches = 1, self._mapped_stretches(1)
        lo, hi = data.draw(st.sampled_from(stretches), label="stretch")
        # Anywhere in the stretch, or at a page some earlier step touched.
        near = sorted(p for p in self.probes | {lo} if lo <= p < hi)
        start = data.draw(st.integers(lo, hi - 1) | st.sampled_from(near), label="start")
        near = sorted(p + 1 for p in self.probes | {hi - 1} if start <= p < hi)
        stop = data.draw(st.integers(start + 1, hi) | st.sampled_from(near), label="stop")
        self._remove(start, stop, n)

    @precondition(lambda self: self.intervals)
    @rule(data=st.data())
    def remove_an_added_range(self, data: st.DataObject) -> None:
        self._remove(*data.draw(st.sampled_from(self.intervals), label="range"))

    @rule(r=ranges, n=times)
    def remove_anything(self, r: Range, n: int) -> None:
        """A range that may hold a page with fewer than ``n`` counts: then ValueError, and
        nothing changes."""
        start, stop = r
        low = min(c for a, b, c in model_runs(self.intervals) if a < stop and b > start)
        if low >= n:
            self._remove(start, stop, n)
            return
        event("remove refused")
        before = list(self.counts.runs())
        with pytest.raises(ValueError, match="is not mapped") as refused:
            self.counts.remove(start, stop, n)
        assert list(self.counts.runs()) == before
        # The page it names is in the range, and has the count it says, under n.
        named = re.fullmatch(
            rf"page (\d+) is not mapped {n} times \(its count is (\d+)\)", str(refused.value)
        )
        assert named is not None, str(refused.value)
        page, count = int(named[1]), int(named[2])
        assert start <= page < stop and count < n
        assert count == next(c for a, b, c in model_runs(self.intervals) if a <= page < b)

    @rule(page=pages)
    def probe(self, page: int) -> None:
        assert self.counts.count(page) == model_count(self.intervals, page)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def runs_match_the_model(self) -> None:
        runs = list(self.counts.runs())
        assert runs == model_runs(self.intervals)
        assert all(x[2] != y[2] for x, y in itertools.pairwise(runs)), "neighbours not merged"
        if not self.counts.ndense():
            assert self.counts.nruns() == len(runs)
        assert self.counts.mapped_pages() == sum(b - a for a, b, c in runs if c)
        assert self.counts.zero_ranges() == [(a, b) for a, b, c in runs if c == 0]
        assert self.counts.diff(MapCounts(NPAGES)) == [(a, b, c, 0) for a, b, c in runs if c]

    @invariant()
    def counts_match_at_probes(self) -> None:
        runs = model_runs(self.intervals)
        starts = [a for a, _, _ in runs]
        for page in self.probes:
            expected = runs[bisect.bisect_right(starts, page) - 1][2]
            assert self.counts.count(page) == expected, page

    @invariant()
    def no_chunk_holds_too_many_runs(self) -> None:
        """A chunk whose runs would take more memory than its pages' counts is dense."""
        counts, size = self.counts, self.chunk_pages
        starts = list(counts._starts)
        for chunk in {a // size for a in starts}:
            if chunk in counts._dense:
                continue
            lo, hi = chunk * size, min(chunk * size + size, NPAGES)
            held = bisect.bisect_left(starts, hi) - bisect.bisect_right(starts, lo) + 1
            assert held <= counts._densify_at, (chunk, held)

    @invariant()
    def runs_are_lists_while_few(self) -> None:
        starts, counts = self.counts._starts, self.counts._counts
        assert type(starts) is type(counts)
        if isinstance(starts, list):
            assert len(starts) <= LIST_RUNS
        else:
            event("runs in arrays")

    @invariant()
    def memory_is_small(self) -> None:
        # A run: 16 bytes in arrays, in lists two slots and an int object (at most 48
        # bytes; lists hold 32 runs at most), plus at most 4 bytes a page of a dense chunk
        # (1 unless a count passed 255): nothing per page elsewhere.
        dense = self.counts.ndense() * 4 * self.chunk_pages
        per_run = 48 if isinstance(self.counts._starts, list) else 16
        assert self.counts.nbytes() <= per_run * self.counts.nruns() + dense
        if self.counts.ndense():
            event("some chunk is dense")


CountsMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestCounts = CountsMachine.TestCase


class SmallChunksMachine(CountsMachine):
    """The same with 12-page chunks (the last one cut short): chunks turn dense and back
    all the time, and ranges cross between dense chunks and runs."""

    chunk_pages = 12


SmallChunksMachine.TestCase.settings = CountsMachine.TestCase.settings
TestCountsWithDenseChunks = SmallChunksMachine.TestCase


class MidChunksMachine(CountsMachine):
    """256-page chunks: dense past 16 runs, few enough for the fragment rule to reach,
    many enough that ``_crowded`` looks before ``_maybe_densify`` counts."""

    chunk_pages = 256


MidChunksMachine.TestCase.settings = CountsMachine.TestCase.settings
TestCountsWithMidChunks = MidChunksMachine.TestCase


def test_alternating_counts_turn_dense_and_back() -> None:
    """ubd-mmap's pattern: every other page of a mapped range loses its count."""
    counts = MapCounts(1 << 18)  # 1 GiB of 4 KiB pages
    counts.add(0, 1 << 18)
    for page in range(0, 1 << 18, 2):
        assert counts.remove(page, page + 1) == [(page, page + 1)]
    assert counts.ndense() == 64  # every chunk
    assert counts.nbytes() <= (1 << 18) + 4096  # a byte a page: 256 KiB a GiB
    assert counts.count(2) == 0 and counts.count(3) == 1
    assert counts.mapped_pages() == 1 << 17
    for page in range(0, 1 << 18, 2):
        counts.add(page, page + 1)
    assert counts.ndense() == 0
    assert list(counts.runs()) == [(0, 1 << 18, 1)]


def test_a_dense_chunk_widens_for_big_counts() -> None:
    counts = MapCounts(64, chunk_pages=16)
    for page in range(0, 16, 2):
        counts.add(page, page + 1)
    assert counts.ndense() == 1
    small = counts.nbytes()
    counts.add(2, 3, 299)
    assert counts.count(2) == 300 and counts.nbytes() == small + 16  # 2 bytes a page
    counts.add(0, 1, 70_000)
    assert counts.count(0) == 70_001 and counts.nbytes() == small + 3 * 16  # 4 bytes a page
    assert counts.count(2) == 300
    assert counts.remove(0, 1, 70_001) == [(0, 1)]
    with pytest.raises(ValueError, match="page 0 is not mapped 1 times"):
        counts.remove(0, 2)


def test_empty_tib_costs_one_run() -> None:
    counts = MapCounts(NPAGES)
    assert list(counts.runs()) == [(0, NPAGES, 0)]
    assert counts.nbytes() < 64


def test_whole_space_round_trip() -> None:
    counts = MapCounts(NPAGES)
    counts.add(0, NPAGES)
    counts.add(5, 7)
    assert counts.remove(0, NPAGES) == [(0, 5), (7, NPAGES)]
    assert counts.remove(5, 7) == [(5, 7)]
    assert list(counts.runs()) == [(0, NPAGES, 0)]


@pytest.mark.parametrize(("start", "stop"), [(-1, 1), (3, 3), (4, 2), (0, NPAGES + 1)])
def test_bad_ranges_raise(start: int, stop: int) -> None:
    counts = MapCounts(NPAGES)
    counts.add(0, 10)
    before = list(counts.runs())
    for call in (counts.add, counts.remove):
        with pytest.raises(ValueError, match=rf"\[{start}, {stop}\)"):
            call(start, stop)
        with pytest.raises(ValueError, match=rf"\[{start}, {stop}\)"):  # the range first
            call(start, stop, None)  # type: ignore[arg-type]
    for delta in (1, -1):
        with pytest.raises(ValueError, match=rf"\[{start}, {stop}\)"):
            counts.change(start, stop, delta)
    assert list(counts.runs()) == before


@pytest.mark.parametrize("n", [0, -1])
def test_a_change_of_less_than_one_is_refused(n: int) -> None:
    counts = MapCounts(64, chunk_pages=4)
    counts.add(0, 1)
    counts.add(2, 3)  # chunk 0 dense
    before = list(counts.runs())
    for call in (counts.add, counts.remove):
        with pytest.raises(ValueError, match=f"at least 1, not {n}"):
            call(0, 8, n)
    with pytest.raises(ValueError, match="at least 1, not 0"):
        counts.change(0, 8, 0)
    assert list(counts.runs()) == before


def test_counts_past_32_bits_in_dense_chunks() -> None:
    counts = MapCounts(8, chunk_pages=4)
    counts.add(4, 5)
    counts.add(6, 7)  # chunk 1 dense
    counts.add(0, 8, 2**32)
    assert [counts.count(p) for p in range(8)] == [2**32] * 4 + [2**32 + 1, 2**32] * 2
    assert counts.remove(0, 8, 2**32) == [(0, 4), (5, 6), (7, 8)]


def test_runs_last_first_walks_runs_not_pages() -> None:
    counts = MapCounts(1 << 40, chunk_pages=64)  # 2**40 pages: far too many to walk
    counts.add(5, 9)
    counts.add((1 << 40) - 3, 1 << 40, 2)
    assert list(counts.runs_last_first(window=16)) == [
        ((1 << 40) - 3, 1 << 40, 2),
        (9, (1 << 40) - 3, 0),
        (5, 9, 1),
        (0, 5, 0),
    ]
    dense = MapCounts(256, chunk_pages=64)
    for page in range(64, 128, 2):  # 1, 0, 1, 0: the chunk turns dense
        dense.add(page, page + 1)
    assert dense.ndense() == 1
    pages = [0] * 256
    for a, b, c in dense.runs_last_first(window=16):
        assert all(pages[p] == 0 for p in range(a, b))  # each page once
        pages[a:b] = [c + 1] * (b - a)
    assert pages == [dense.count(p) + 1 for p in range(256)]


def test_compact_undoes_the_dense_form_a_removal_made() -> None:
    counts = MapCounts(256, chunk_pages=64)  # a chunk turns dense past 4 runs
    counts.add(0, 256)
    counts.remove(1, 2)  # a hole: 3 runs in the first chunk
    assert counts.ndense() == 0
    runs = counts.nruns()
    counts.remove(3, 4)  # one more hole: the chunk turns dense
    assert counts.ndense() == 1
    counts.add(3, 4)  # undone: the values are back, the form is not
    counts.compact(3, 4, keep=set())
    assert (counts.ndense(), counts.nruns()) == (0, runs)
    counts.remove(3, 4)  # dense again, and this time it was dense before: it stays so
    was_dense = counts.dense_edges(5, 6)
    counts.remove(5, 6)
    counts.add(5, 6)
    counts.compact(5, 6, keep=was_dense)
    assert counts.ndense() == 1 and was_dense == {0}


def test_a_refused_remove_in_a_dense_chunk_names_the_page() -> None:
    """The page named is the one without the counts (it was the chunk's index of it, added
    to the range's start: page 3 was named as page 6)."""
    counts = MapCounts(64, chunk_pages=16)
    for page in range(0, 16, 2):
        counts.add(page, page + 1)
    counts.add(16, 32)  # a second chunk, as runs
    assert counts.ndense() == 1
    with pytest.raises(ValueError, match=r"^page 1 is not mapped 1 times \(its count is 0\)$"):
        counts.remove(0, 2)
    with pytest.raises(ValueError, match=r"^page 3 is not mapped 1 times \(its count is 0\)$"):
        counts.remove(2, 4)
    with pytest.raises(ValueError, match=r"^page 15 is not mapped 1 times"):
        counts.remove(14, 20)


@pytest.mark.parametrize(
    ("args", "named"),
    [((2, 5, 1.5), "1.5"), ((2.5, 5, 1), "2.5"), ((2, 5.0, 1), "5.0"), ((2, 5, True), "True")],
)
def test_a_number_not_an_int_is_refused_before_anything_changes(
    args: tuple[object, object, object], named: str
) -> None:
    """An array takes no float: found half way through a change, it stopped it half made."""
    counts = MapCounts(10)
    counts.add(0, 10)
    counts.add(3, 4)
    before = list(counts.runs())
    start, stop, n = args
    calls = [
        lambda: counts.add(start, stop, n),  # type: ignore[arg-type]
        lambda: counts.remove(start, stop, n),  # type: ignore[arg-type]
        lambda: counts.change(start, stop, n),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(TypeError, match=named):
            call()
        assert list(counts.runs()) == before
