"""The guest page cache: (file, page) -> frame with LRU eviction, against a model."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devanon.guest.pagecache import PageCache
from devanon.units import Frame


def test_runs_are_put_in_order() -> None:
    c = PageCache(16)
    c.put(3, 10, Frame(4), 3)
    assert [c.peek(3, p) for p in (9, 10, 11, 12, 13)] == [None, 4, 5, 6, None]
    assert c.evict(1) == [(3, 10, 4)]


def test_lookup_and_lru_order() -> None:
    c = PageCache(8)
    c.put(0, 0, Frame(3))
    c.put(0, 1, Frame(4))
    c.put(1, 7, Frame(5))
    assert c.get(0, 0) == 3  # now the most recent
    assert c.peek(9, 9) is None and c.get(0, 2) is None
    assert c.evict(2) == [(0, 1, 4), (1, 7, 5)]
    assert len(c) == 1 and c.peek(0, 1) is None


def test_errors() -> None:
    c = PageCache(4)
    c.put(0, 0, Frame(0))
    with pytest.raises(ValueError, match=r"a frame of \[0, 1\) already holds"):
        c.put(1, 0, Frame(0))
    with pytest.raises(ValueError, match=r"a page of \[0, 1\) of file 0 is cached"):
        c.put(0, 0, Frame(1))
    with pytest.raises(ValueError, match=r"frames \[3, 5\) are not among the 4"):
        c.put(2, 0, Frame(3), 2)


ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "get", "evict", "pop"]), st.integers(0, 3), st.integers(0, 40)
    ),
    max_size=80,
)


@given(ops)
def test_matches_an_ordered_dict(sequence: list[tuple[str, int, int]]) -> None:
    c = PageCache(16)
    model: OrderedDict[tuple[int, int], int] = OrderedDict()
    for op, file, page in sequence:
        key = (file, page)
        if op == "put":
            if key in model or len(model) == 16:
                continue
            frame = min(set(range(16)) - set(model.values()))
            c.put(file, page, Frame(frame))
            model[key] = frame
        elif op == "get":
            assert c.get(file, page) == model.get(key)
            if key in model:
                model.move_to_end(key)
        elif op == "pop":
            assert c.pop(file, page) == model.pop(key, None)
        else:
            n = page % 5
            want = list(model.items())[:n]
            assert c.evict(n) == [(f, p, fr) for (f, p), fr in want]
            for k, _ in want:
                del model[k]
        assert len(c) == len(model)
    assert c.items() == [(f, p, fr) for (f, p), fr in model.items()]
