"""ubd and the guest, with the kernel as the oracle: checksums, st_blocks, mincore, VMAs.

A small root (files of distinct bytes, sizes not page multiples), an image of it on a disk
filesystem, and a trace that reads every file in chunks (and some of them twice).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pytest
from support import needs_root

from devanon import measure
from devanon.guest.machine import Guest
from devanon.guest.plan import Plan
from devanon.image import Manifest, build_image
from devanon.trace import format_trace, parse_trace
from devanon.ubd import BlockDevice, Mode
from devanon.units import Block, Frame

PS = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
OTHER = 256 << 10
MODES = [Mode.COPY, Mode.MMAP]


def file_bytes(i: int) -> bytes:
    size = 3000 + 17_000 * i + (i % 3) * 1234
    return hashlib.shake_256(f"file {i}".encode()).digest(size)


@pytest.fixture
def root(disk_dir: Path) -> Path:
    r = disk_dir / "root"
    for i in range(24):
        p = r / f"d{i % 4}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(file_bytes(i))
    return r


@pytest.fixture
def image(root: Path, disk_dir: Path) -> tuple[Path, Manifest]:
    img = disk_dir / "disk.img"
    return img, build_image(root, img)


def chunked_trace(root: Path, chunk: int = 5000) -> tuple[str, int]:
    """Reads of every file in ``chunk`` pieces, the first files twice; and their CRC."""
    reads = []
    for path in sorted(p.relative_to(root).as_posix() for p in root.rglob("*.bin")):
        size = (root / path).stat().st_size
        reads += [(path, off, min(chunk, size - off)) for off in range(0, size, chunk)]
    reads += reads[:10]
    crc = 0
    for path, off, n in reads:
        with open(root / path, "rb") as f:
            f.seek(off)
            crc = zlib.crc32(f.read(n), crc)
    return format_trace(reads, {"guest_other_bytes": OTHER}), crc


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_the_guest_reads_what_the_image_holds(
    mode: Mode, root: Path, image: tuple[Path, Manifest]
) -> None:
    img, manifest = image
    text, want = chunked_trace(root)
    plan = Plan.compile(parse_trace(text), manifest)
    with Guest.create(img, mode, 32 * MIB) as guest:
        guest.add_other_memory(plan.guest_other_bytes)
        result = guest.replay(plan)
        assert result.crc == want
        assert result.page_hits > 0  # the repeated reads came from the page cache
        data = guest.read(manifest, "d1/f5.bin", 100, 30000)
        assert data == file_bytes(5)[100:30100]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_host_cost_of_one_guest(mode: Mode, root: Path, image: tuple[Path, Manifest]) -> None:
    """copy: the Anon holds other + every page read; mmap: other only, and the image's page
    cache holds the pages read, once (st_blocks of the memfd, mincore of the image)."""
    img, manifest = image
    plan = Plan.compile(parse_trace(chunked_trace(root)[0]), manifest)
    assert measure.drop_file_cache(img) == 0
    with Guest.create(img, mode, 32 * MIB) as guest:
        guest.add_other_memory(OTHER)
        guest.replay(plan)
        other = -(-OTHER // PS) * PS
        disk = plan.distinct_bytes
        if mode is Mode.COPY:
            assert guest.memory.resident_bytes() == other + disk
        else:
            assert guest.memory.resident_bytes() == other
            assert guest.memory.overlay_calls < plan.reads  # extents, not pages
        # the pages read, in both modes: no readahead beyond them. (The kernel may drop a
        # clean page or two of the image meanwhile: seen once in a CI run, 2 pages short.)
        assert disk - 4 * PS <= measure.cached_bytes(img) <= disk


def test_extents_keep_the_mapping_count_low(root: Path, image: tuple[Path, Manifest]) -> None:
    img, manifest = image
    text, _ = chunked_trace(root, chunk=PS)  # one page a read: worst case
    plan = Plan.compile(parse_trace(text), manifest)
    with Guest.create(img, Mode.MMAP, 32 * MIB) as guest:
        guest.replay(plan)
        files = len(manifest.files)
        # one overlay VMA per file at most (neighbour files may merge), plus the Anon around
        assert guest.memory.vmas() <= 2 * files + 1
        assert guest.memory.overlay_calls >= plan.reads - 10  # every read mapped ...
        assert guest.memory.vmas() < plan.reads // 4  # ... and merged by the kernel


@needs_root
def test_a_big_page_cache_fits_under_a_low_max_map_count(disk_dir: Path, sysctl: object) -> None:
    """4096 single-page reads of one file, with vm.max_map_count at 1000: extents merge."""
    img = disk_dir / "big.img"
    with open(img, "wb") as f:
        f.truncate(4096 * PS)  # sparse: no data, no cost until read
    assert callable(sysctl)
    sysctl("vm.max_map_count", 1000)
    with Guest.create(img, Mode.MMAP, 4200 * PS, prefetch=False) as guest:
        for page in range(4096):
            guest.load(0, page, Block(page), 1)
        assert guest.memory.overlay_calls == 4096
        assert guest.memory.vmas() <= 3


def test_one_gib_of_page_cache_under_the_default_max_map_count(disk_dir: Path) -> None:
    """A guest with 1 GiB of page cache, read in 64 KiB pieces (16384 overlays), works."""
    size = 1 << 30
    img = disk_dir / "gib.img"
    with open(img, "wb") as f:
        f.truncate(size)  # sparse; pages are mapped, never touched (no prefetch)
    with Guest.create(img, Mode.MMAP, size + 16 * MIB, prefetch=False) as guest:
        step = 16
        for page in range(0, size // PS, step):
            guest.load(0, page, Block(page), step)
        assert len(guest.cache) == size // PS
        assert guest.memory.overlay_calls == size // PS // step
        with open("/proc/sys/vm/max_map_count") as f:
            assert guest.memory.vmas() < int(f.read()) // 100


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_writes_go_to_the_cow_layer_never_to_the_base(
    mode: Mode, root: Path, image: tuple[Path, Manifest], disk_dir: Path
) -> None:
    img, manifest = image
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    cow = disk_dir / f"{mode.value}.cow"
    with Guest.create(img, mode, 16 * MIB, cow=cow) as guest:
        assert guest.read(manifest, "d0/f4.bin", 0, 10) == file_bytes(4)[:10]
        guest.write(manifest, "d0/f4.bin", 5000, b"written by the guest")
        if mode is Mode.MMAP:  # the frame was an overlay: sharing was broken first
            assert guest.device.stats.unshared_frames == 1
        assert guest.read(manifest, "d0/f4.bin", 4990, 40) == (
            file_bytes(4)[4990:5000] + b"written by the guest" + file_bytes(4)[5020:5030]
        )
        assert guest.device.cow is not None and guest.device.cow.blocks_written == 1
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    # another guest on the same COW file reads the written block from it
    with Guest.create(img, mode, 16 * MIB, cow=cow) as again:
        data = again.read(manifest, "d0/f4.bin", 5000, 20)
        assert data == b"written by the guest"
        assert again.device.stats.cow_blocks_read == 1
    # a guest without the COW file sees the base
    with Guest.create(img, mode, 16 * MIB) as fresh:
        assert fresh.read(manifest, "d0/f4.bin", 5000, 20) == file_bytes(4)[5000:5020]
        with pytest.raises(ValueError, match="read-only: give a COW file"):
            fresh.write(manifest, "d0/f4.bin", 0, b"x")


def test_a_frame_released_after_an_overlay_reads_zeros_and_costs_nothing(
    image: tuple[Path, Manifest],
) -> None:
    img, _ = image
    with Guest.create(img, Mode.MMAP, 4 * MIB) as guest:
        mem = guest.memory
        span = mem.span(Frame(0), 4)
        span[:] = b"\x55" * len(span)  # the guest wrote the frames: the host holds them
        assert mem.resident_bytes() == 4 * PS
        guest.device.read(Frame(0), Block(0), 4)  # an overlay: the Anon pages are punched
        assert mem.resident_bytes() == 0
        with open(img, "rb") as f:
            assert bytes(mem.span(Frame(0), 4)) == f.read(4 * PS)
        guest.device.release(Frame(0), 4)
        assert not mem.is_overlaid(Frame(0))
        assert os.pread(mem.anon.fd, 4 * PS, 0) == bytes(4 * PS)  # the kernel's bytes
        assert mem.resident_bytes() == 0
        assert mem.anon.map_count(0) == 1  # the guest still maps it


def test_copy_mode_gives_evicted_frames_back(root: Path, image: tuple[Path, Manifest]) -> None:
    img, manifest = image
    plan = Plan.compile(parse_trace(chunked_trace(root)[0]), manifest)
    # guest memory smaller than what the trace reads: the LRU evicts, frames go back at once
    with Guest.create(img, Mode.COPY, 64 * PS) as guest:
        result = guest.replay(plan)
        assert result.pages_evicted > 0
        assert guest.memory.resident_bytes() == len(guest.cache) * PS
        guest.drop_caches()
        assert guest.memory.resident_bytes() == 0


def test_bad_device_input_is_named(image: tuple[Path, Manifest], disk_dir: Path) -> None:
    img, _ = image
    with Guest.create(img, Mode.COPY, 1 * MIB) as guest:
        with pytest.raises(ValueError, match=r"blocks \[.*\) are outside"):
            guest.device.read(Frame(0), Block(10**9), 1)
        with pytest.raises(ValueError, match=r"frames \[300, 301\) are outside guest memory"):
            guest.device.read(Frame(300), Block(0), 1)
    with pytest.raises(ValueError, match="mode must be 'copy' or 'mmap', not 'both'"):
        Mode.parse("both")
    odd = disk_dir / "odd.img"
    odd.write_bytes(b"x" * 100)
    with (
        Guest.create(img, Mode.COPY, 1 * MIB) as guest,
        pytest.raises(ValueError, match="not a multiple of the block size"),
    ):
        BlockDevice(odd, guest.memory, Mode.COPY)
    with pytest.raises(FileNotFoundError, match=r"disk image '/nonexistent\.img' does not exist"):
        Guest.create("/nonexistent.img", Mode.COPY, 1 * MIB)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_bad_trace_lines_are_skipped_and_the_replay_goes_on(
    mode: Mode, root: Path, image: tuple[Path, Manifest]
) -> None:
    img, manifest = image
    text, want = chunked_trace(root)
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    lines[first:first] = ["gone/missing.bin\t0\t10", "d0/f0.bin\t0\t999999"]
    plan = Plan.compile(parse_trace("\n".join(lines)), manifest)
    assert [(p.line, p.path) for p in plan.problems] == [
        (first + 1, "gone/missing.bin"),
        (first + 2, "d0/f0.bin"),
    ]
    with Guest.create(img, mode, 32 * MIB) as guest:
        assert guest.replay(plan).crc == want  # every good line, in order


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_a_read_that_fits_is_not_evicted_by_its_own_eviction(mode: Mode, disk_dir: Path) -> None:
    root = disk_dir / "evict-root"
    root.mkdir()
    (root / "x").write_bytes(b"x" * 2 * PS)
    (root / "y").write_bytes(bytes(range(256)) * 16 * 31)
    manifest = build_image(root, disk_dir / "evict.img")
    with Guest.create(disk_dir / "evict.img", mode, 32 * PS) as guest:
        guest.read(manifest, "x", 0, 2 * PS)  # two older pages
        guest.read(manifest, "y", 10 * PS, 1)
        # 31 pages into 32 frames: 29 free, the two older pages must go, and only they
        assert guest.read(manifest, "y", 0, 31 * PS) == bytes(range(256)) * 16 * 31
