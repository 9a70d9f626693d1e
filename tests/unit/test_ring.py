"""The request ring's two sides on one memfd, against a plain model of two queues."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devanon.broker import ring as rings

pytestmark = pytest.mark.skipif(not rings.SUPPORTED, reason="rings are x86-64 only")


@pytest.fixture
def pair() -> Iterator[tuple[rings.ClientRing, rings.DaemonRing]]:
    fd = rings.create()
    try:
        client, daemon = rings.ClientRing(fd), rings.DaemonRing(fd)
    finally:
        os.close(fd)
    yield client, daemon
    client.close()
    daemon.close()


STEPS = st.lists(
    st.sampled_from(["post", "take", "reply", "read", "daemon_sleeps", "client_sleeps"]),
    max_size=3 * rings.SLOTS,
)


@settings(max_examples=60, deadline=None)
@given(steps=STEPS, seed=st.integers(0, 2**32 - 1))
def test_both_queues_keep_order_and_room_like_a_model(steps: list[str], seed: int) -> None:
    fd = rings.create()
    client, daemon = rings.ClientRing(fd), rings.DaemonRing(fd)
    os.close(fd)
    requests: deque[tuple[int, ...]] = deque()
    replies: deque[tuple[int, int, int]] = deque()
    seq = seed
    try:
        for step in steps:
            if step == "post":
                seq = (seq + 1) & 0xFFFFFFFF
                record = (2 + seq % 2, seq % 2, seq, seq % 7, seq * 4096, 4096)
                posted = client.post(*record)
                assert posted == (rings.FULL if len(requests) == rings.SLOTS else rings.POSTED)
                if posted:
                    requests.append(record)
            elif step == "take":
                assert daemon.take() == list(requests)
                requests.clear()
            elif step == "reply":
                wake = daemon.reply(2, seq % 2, seq)
                if len(replies) == rings.SLOTS:
                    assert wake is None  # no room: the daemon cuts such a client off
                else:
                    assert wake is False
                    replies.append((2, seq % 2, seq))
            elif step == "read":
                assert client.reply() == (replies.popleft() if replies else None)
            elif step == "daemon_sleeps":
                daemon.sleep(True)
                if len(requests) < rings.SLOTS:
                    assert client.post(2, 0, 1, 1, 0, 4096) == rings.WAKE_DAEMON
                    requests.append((2, 0, 1, 1, 0, 4096))
                daemon.sleep(False)
            else:
                assert client.sleep(True) == bool(replies)
                if len(replies) < rings.SLOTS:
                    assert daemon.reply(2, 0, 9) is True  # it asks for a WAKE
                    replies.append((2, 0, 9))
                client.sleep(False)
            assert daemon.pending() == bool(requests)
    finally:
        client.close()
        daemon.close()


def test_impossible_indices_are_refused_by_either_side(
    pair: tuple[rings.ClientRing, rings.DaemonRing],
) -> None:
    client, daemon = pair
    client.words[rings.REQ_TAIL] = rings.SLOTS + 1  # a client claiming too many requests
    with pytest.raises(rings.RingError, match="257 requests past ours"):
        daemon.take()
    client.words[rings.REQ_TAIL] = 0
    client.words[rings.REP_HEAD] = 5  # a client claiming it read replies never written
    assert daemon.reply(2, 0, 1) is None
    client.words[rings.REP_HEAD] = 0
    daemon.words[rings.REP_TAIL] = 2**63  # a daemon gone wrong
    with pytest.raises(rings.RingError, match="reply index"):
        client.reply()


def test_a_ring_cannot_be_shrunk_under_the_daemon() -> None:
    fd = rings.create()
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == rings.SIZE
    finally:
        os.close(fd)
