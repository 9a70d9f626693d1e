"""Bad input raises an exception naming the value, and changes no count and no byte."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import oracle
import pytest

import devanon

PS = devanon.PAGE_SIZE
SIZE = 16 * PS


class World:
    """An Anon with two mappings, one overlay and written bytes; ``snapshot`` reads the kernel."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.mem = devanon.Anon(SIZE)
        self.a = self.mem.map(0, 8 * PS)
        self.b = self.mem.map(4 * PS, 8 * PS)
        view = self.a.view()
        view[:] = b"a" * 8 * PS
        del view
        self.ov = self.mem.overlay(self.b.address + 6 * PS, image, 0, 2 * PS)

    def snapshot(self) -> tuple[object, ...]:
        mem = self.mem
        return (
            oracle.maps_counts(mem.fd, PS),
            [mem.map_count(p * PS) for p in range(SIZE // PS)],
            oracle.data_pages(mem.fd, SIZE, PS),
            os.pread(mem.fd, SIZE, 0),
            mem.stats(),
        )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    image = tmp_path / "img"
    image.write_bytes(b"i" * 4 * PS)
    w = World(image)
    yield w
    w.mem.close()


def fifo(w: World) -> Path:
    """A FIFO beside the world's image (opening it would wait for a writer)."""
    path = w.image.parent / "fifo"
    if not path.exists():
        os.mkfifo(path)
    return path


# (label, call, exception, text the message must hold)
CASES: list[tuple[str, Callable[[World], object], type[Exception], str]] = [
    ("size zero", lambda w: devanon.Anon(0), ValueError, "0"),
    ("size negative", lambda w: devanon.Anon(-PS), ValueError, str(-PS)),
    ("size unaligned", lambda w: devanon.Anon(PS + 1), ValueError, hex(PS + 1)),
    ("size a float", lambda w: devanon.Anon(4096.0), TypeError, "4096.0"),  # type: ignore[arg-type]
    ("size a bool", lambda w: devanon.Anon(True), TypeError, "True"),
    ("name not str", lambda w: devanon.Anon(PS, name=b"x"), TypeError, "b'x'"),  # type: ignore[arg-type]
    ("name too long", lambda w: devanon.Anon(PS, name="n" * 250), ValueError, "at most 249"),
    ("name with a NUL", lambda w: devanon.Anon(PS, name="a\0b"), ValueError, "'a\\x00b'"),
    ("size past off_t", lambda w: devanon.Anon(1 << 63), ValueError, str(1 << 63)),
    ("hugepages a str", lambda w: devanon.Anon(PS, hugepages="no"), TypeError, "'no'"),  # type: ignore[arg-type]
    ("map writable a str", lambda w: w.mem.map(0, PS, writable="no"), TypeError, "'no'"),  # type: ignore[arg-type]
    ("map inherit an int", lambda w: w.mem.map(0, PS, inherit=1), TypeError, "int 1"),  # type: ignore[arg-type]
    ("map offset unaligned", lambda w: w.mem.map(100, PS), ValueError, "0x64"),
    ("map offset negative", lambda w: w.mem.map(-PS, PS), ValueError, str(-PS)),
    ("map length zero", lambda w: w.mem.map(0, 0), ValueError, "0"),
    ("map past the end", lambda w: w.mem.map(12 * PS, 8 * PS), ValueError, hex(20 * PS)),
    ("map length a str", lambda w: w.mem.map(0, "4096"), TypeError, "'4096'"),  # type: ignore[arg-type]
    (
        "map address unaligned",
        lambda w: w.mem.map(0, PS, address=w.a.address + 1),
        ValueError,
        "not a multiple",
    ),
    ("map over foreign memory", lambda w: w.mem.map(0, PS, address=0x10000), ValueError, "0x10000"),
    ("unmap what isn't mapped", lambda w: w.mem.unmap(0x10000, PS), ValueError, "0x10000"),
    (
        "unmap past a mapping",
        lambda w: w.mem.unmap(w.a.address, 9 * PS),
        ValueError,
        "not all mapped",
    ),
    ("unmap length unaligned", lambda w: w.mem.unmap(w.a.address, 10), ValueError, "0xa"),
    ("unmap address zero", lambda w: w.mem.unmap(0, PS), ValueError, "0"),
    (
        "overlay foreign memory",
        lambda w: w.mem.overlay(0x10000, w.image, 0, PS),
        ValueError,
        "0x10000",
    ),
    (
        "overlay past the file",
        lambda w: w.mem.overlay(w.a.address, w.image, 0, 8 * PS),
        ValueError,
        "past its end",
    ),
    (
        "overlay missing file",
        lambda w: w.mem.overlay(w.a.address, "/no/such", 0, PS),
        FileNotFoundError,
        "/no/such",
    ),
    (
        "overlay file offset unaligned",
        lambda w: w.mem.overlay(w.a.address, w.image, 1, PS),
        ValueError,
        "0x1",
    ),
    ("overlay file a list", lambda w: w.mem.overlay(w.a.address, [1], 0, PS), TypeError, "[1]"),  # type: ignore[arg-type]
    ("overlay fd not open", lambda w: w.mem.overlay(w.a.address, 9999, 0, PS), OSError, "fd 9999"),
    ("overlay a FIFO", lambda w: w.mem.overlay(w.a.address, fifo(w), 0, PS), ValueError, "FIFO"),
    (
        "overlay a directory",
        lambda w: w.mem.overlay(w.a.address, w.image.parent, 0, PS),
        ValueError,
        "is a directory",
    ),
    (
        "overlay writable a str",
        lambda w: w.mem.overlay(w.a.address, w.image, 0, PS, writable="yes"),  # type: ignore[arg-type]
        TypeError,
        "'yes'",
    ),
    ("map_count past the end", lambda w: w.mem.map_count(SIZE), ValueError, hex(SIZE)),
    ("map_count a float", lambda w: w.mem.map_count(1.0), TypeError, "1.0"),  # type: ignore[arg-type]
    ("map offset a NumPy bool", lambda w: w.mem.map(np.False_, PS), TypeError, "False"),  # type: ignore[arg-type]
    ("map length a NumPy float", lambda w: w.mem.map(0, np.float64(PS)), TypeError, "4096.0"),  # type: ignore[arg-type]
    (
        "unmap length an array",
        lambda w: w.mem.unmap(w.a.address, np.array([PS])),
        TypeError,
        "[4096]",
    ),  # type: ignore[arg-type]
    ("punch negative", lambda w: devanon.punch_hole(w.image, -1, PS), ValueError, "-1"),
    ("punch zero length", lambda w: devanon.punch_hole(w.image, 0, 0), ValueError, "0"),
    (
        "punch past the end",
        lambda w: devanon.punch_hole(w.image, 1 << 30, PS),
        ValueError,
        str(1 << 30),
    ),
    ("punch fd not open", lambda w: devanon.punch_hole(-1, 0, PS), OSError, "fd -1"),
    ("punch a FIFO", lambda w: devanon.punch_hole(fifo(w), 0, PS), ValueError, "FIFO"),
    (
        "punch no such file",
        lambda w: devanon.punch_hole("/no/such", 0, PS),
        FileNotFoundError,
        "/no/such",
    ),
]


@pytest.mark.parametrize(("label", "call", "exc", "text"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(
    world: World, label: str, call: Callable[[World], object], exc: type[Exception], text: str
) -> None:
    before = world.snapshot()
    image_before = world.image.read_bytes()
    with pytest.raises(exc) as info:
        call(world)
    assert text in str(info.value), f"{label}: {info.value}"
    assert world.snapshot() == before
    assert world.image.read_bytes() == image_before


def test_closed_objects_are_refused(world: World) -> None:
    a = world.a
    world.mem.unmap(a.address, a.length)
    with pytest.raises(ValueError, match="already closed"):
        a.close()
    before = world.snapshot()
    world.ov.release()
    with pytest.raises(ValueError, match="already released"):
        world.ov.release()
    assert world.snapshot() != before  # the release itself did change things
    world.mem.close()
    for call in (
        lambda: world.b.close(),
        lambda: world.mem.unmap(world.b.address, PS),
        lambda: world.mem.overlay(world.b.address, world.image, 0, PS),
    ):
        with pytest.raises(ValueError, match="closed"):
            call()


@pytest.mark.parametrize("others", [0, 3])
def test_a_map_the_kernel_refuses_changes_no_figure(others: int) -> None:
    """``others``: single pages mapped beside, so that the refused map splits runs (and the
    counts' memory must come back to what it was, not to what the splits left)."""
    with devanon.Anon(1 << 47) as mem:  # 128 TiB: more than a process's address space
        keep = mem.map(0, PS)
        keep.view()[:4] = b"kept"
        beside = [mem.map((10 * i + 5) * PS, PS) for i in range(others)]
        before = mem.stats()
        with pytest.raises(OSError):
            mem.map(2 * PS, (1 << 47) - 4 * PS)
        assert mem.stats() == before  # no punch of the pages it had counted for a moment
        assert mem.map_count(0) == 1 == oracle.maps_counts(mem.fd, PS)[0]
        assert bytes(keep.view()[:4]) == b"kept"
        for m in [keep, *beside]:
            m.close()


def test_numpy_integers_are_taken_as_ints(tmp_path: Path) -> None:
    """Offsets and lengths computed with NumPy (``np.arange(n) * PS``) are integers, as
    ``os`` and ``mmap`` take them (``__index__``): every call works as with ints."""
    image = tmp_path / "img"
    image.write_bytes(b"i" * 2 * PS)
    offsets = np.arange(4, dtype=np.int64) * PS
    with devanon.Anon(np.uint64(SIZE)) as mem:  # type: ignore[arg-type]
        maps = [mem.map(offsets[i], np.int64(2 * PS)) for i in range(3)]
        mem.unmap(np.int64(maps[0].address), np.int32(PS))  # type: ignore[arg-type]
        ov = mem.overlay(np.int64(maps[2].address), image, np.int64(0), np.int64(PS))  # type: ignore[arg-type]
        kernel = oracle.maps_counts(mem.fd, PS)
        ours = [mem.map_count(offsets[0] + p * PS) for p in range(4)]
        assert ours == [kernel.get(p, 0) for p in range(4)] == [0, 2, 1, 1]
        assert type(mem.map_count(offsets[1])) is int
        ov.release()
        for m in maps:
            m.close()
    image.write_bytes(b"i" * 2 * PS)
    result = devanon.punch_hole(image, np.int64(0), np.int64(2 * PS))  # type: ignore[arg-type]
    assert type(result.length) is int and result.length == 2 * PS
    assert os.stat(image).st_blocks == 0
