"""The frame allocator: contiguous runs, the 'near' hint, merging, and a model check."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devanon.guest.frames import FrameAllocator, OutOfFrames
from devanon.units import Frame


def test_contiguous_first_fit() -> None:
    a = FrameAllocator(100)
    assert a.alloc(10) == [(0, 10)]
    assert a.alloc(5) == [(10, 5)]
    assert a.free_frames == 85


def test_near_extends_a_neighbour() -> None:
    a = FrameAllocator(100)
    a.alloc(10)
    a.alloc(10)  # 10..20
    a.free(Frame(0), 10)
    # the frame after 19 is free: take it, although a hole at 0 also fits
    assert a.alloc(3, near=Frame(20)) == [(20, 3)]
    # near a taken frame: ignored
    assert a.alloc(3, near=Frame(15)) == [(0, 3)]


def test_fragmented_request_is_split_over_runs() -> None:
    a = FrameAllocator(10)
    a.alloc(10)
    for f in (1, 2, 5, 8):
        a.free(Frame(f), 1)
    runs = a.alloc(4)
    assert sorted(runs) == [(1, 2), (5, 1), (8, 1)]
    assert a.free_frames == 0


def test_free_merges_neighbours() -> None:
    a = FrameAllocator(30)
    a.alloc(30)
    a.free(Frame(0), 10)
    a.free(Frame(20), 10)
    a.free(Frame(10), 10)
    assert a.runs() == [(0, 30)]


def test_errors_name_the_frames() -> None:
    a = FrameAllocator(8)
    with pytest.raises(ValueError, match=r"\[0, 2\) are already"):
        a.free(Frame(0), 2)
    with pytest.raises(ValueError, match=r"\[6, 10\) are not guest frames"):
        a.free(Frame(6), 4)
    with pytest.raises(OutOfFrames, match="9 frames wanted, 8 free"):
        a.alloc(9)
    with pytest.raises(ValueError, match="cannot allocate 0"):
        a.alloc(0)


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 20), st.integers(0, 63)), max_size=60))
def test_matches_a_per_frame_model(ops: list[tuple[bool, int, int]]) -> None:
    a = FrameAllocator(64)
    used: set[int] = set()
    held: list[tuple[int, int]] = []
    for is_alloc, n, near in ops:
        if is_alloc:
            if n > 64 - len(used):
                with pytest.raises(OutOfFrames):
                    a.alloc(n, near=Frame(near))
                continue
            runs = a.alloc(n, near=Frame(near))
            got = [f for start, k in runs for f in range(start, start + k)]
            assert len(got) == n and not used & set(got)
            if near not in used:
                assert runs[0][0] == near  # the hint wins when its frame is free
            used |= set(got)
            held += runs
        elif held:
            start, k = held.pop(near % len(held))
            a.free(Frame(start), k)
            used -= set(range(start, start + k))
        assert a.free_frames == 64 - len(used)
        free = {f for start, k in a.runs() for f in range(start, start + k)}
        assert free == set(range(64)) - used
        runs_ = a.runs()
        assert all(x[0] + x[1] < y[0] for x, y in itertools.pairwise(runs_))
