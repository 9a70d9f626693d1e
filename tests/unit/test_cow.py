"""The COW layer file: header, bitmap, data, reopened."""

from __future__ import annotations

from pathlib import Path

import pytest

from devanon.cow import CowLayer
from devanon.units import Block

BS = 4096


def test_write_runs_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "g.cow"
    with CowLayer.create(path, "/base.img", 64 * BS, BS) as cow:
        assert not cow.has(Block(3))
        cow.write(Block(3), b"x" * (2 * BS))
        assert cow.runs(Block(1), 5) == [(1, 2, False), (3, 2, True), (5, 1, False)]
        assert cow.blocks_written == 2
    with CowLayer.open(path, 64 * BS, BS) as again:
        assert again.has(Block(4)) and not again.has(Block(5))
        assert again.base == "/base.img"
        with open(path, "rb") as f:
            f.seek(again.offset_of(Block(3)))
            assert f.read(BS) == b"x" * BS
    with pytest.raises(ValueError, match="is for a base of 262144 bytes, not 4096"):
        CowLayer.open(path, BS, BS)
    with pytest.raises(ValueError, match="blocks of 4096 bytes, not blocks of 8192"):
        CowLayer.open(path, 64 * BS, 2 * BS)


def test_errors(tmp_path: Path) -> None:
    with CowLayer.create(tmp_path / "g.cow", "/b", 4 * BS, BS) as cow:
        with pytest.raises(ValueError, match="whole blocks"):
            cow.write(Block(0), b"x")
        with pytest.raises(ValueError, match=r"blocks \[3, 5\) are outside"):
            cow.write(Block(3), b"x" * (2 * BS))
    (tmp_path / "junk").write_bytes(b"nope")
    with pytest.raises(ValueError, match="is not a devanon COW file"):
        CowLayer.open(tmp_path / "junk", 4 * BS, BS)


def test_a_truncated_cow_file_claims_no_block(tmp_path: Path) -> None:
    path = tmp_path / "cut.cow"
    CowLayer.create(path, "/b", 64 * BS, BS).close()
    with open(path, "r+b") as f:
        f.truncate(BS)  # the header alone: cut before the bitmap
    with pytest.raises(ValueError, match="truncated"):
        CowLayer.open(path, 64 * BS, BS)


def test_a_cow_file_is_refused_over_another_base_of_the_same_size(tmp_path: Path) -> None:
    path = tmp_path / "g.cow"
    CowLayer.create(path, "/a.img", 4 * BS, BS, base_mtime_ns=111).close()
    with pytest.raises(ValueError, match="modified at 111 ns, not 222"):
        CowLayer.open(path, 4 * BS, BS, base_mtime_ns=222)
    CowLayer.open(path, 4 * BS, BS, base_mtime_ns=111).close()


def test_a_header_missing_a_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "g.cow"
    CowLayer.create(path, "/a.img", 4 * BS, BS).close()
    raw = path.read_bytes()
    header = raw[:BS].rstrip(b"\0").replace(b'"base_size"', b'"base_sighs"')
    path.write_bytes(header.ljust(BS, b"\0") + raw[BS:])
    with pytest.raises(ValueError, match=r"g\.cow' is not a devanon COW file .*base_size"):
        CowLayer.open(path, 4 * BS, BS)


def test_a_cow_file_of_an_older_devanon_is_taken_by_its_size(tmp_path: Path) -> None:
    """Its header has no base_mtime_ns: the base is checked by size alone, as before."""
    path = tmp_path / "old.cow"
    with CowLayer.create(path, "/a.img", 4 * BS, BS) as cow:
        cow.write(Block(1), b"w" * BS)
    raw = path.read_bytes()
    header = raw[:BS].rstrip(b"\0").replace(b', "base_mtime_ns": 0', b"")
    assert b"base_mtime_ns" not in header
    path.write_bytes(header.ljust(BS, b"\0") + raw[BS:])
    with CowLayer.open(path, 4 * BS, BS, base_mtime_ns=12345) as cow:
        assert cow.has(Block(1))
