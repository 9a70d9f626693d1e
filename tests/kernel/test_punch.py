"""punch_hole and `devanon punch`: sys_punch for any file, judged by st_blocks and SEEK_DATA."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import oracle
import pytest

import devanon
from devanon.cli import main
from devanon.sizes import parse_size

PS = devanon.PAGE_SIZE


@pytest.fixture(params=["tmpfs", "disk"])
def data_file(request: pytest.FixtureRequest, tmp_path: Path, disk_dir: Path) -> Path:
    base = Path("/dev/shm") if request.param == "tmpfs" else disk_dir
    path = base / f"devanon-punch-{os.getpid()}"
    path.write_bytes(os.urandom(4 << 20))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    yield path  # type: ignore[misc]
    path.unlink()


def test_punch_hole_frees_the_range_and_keeps_the_rest(data_file: Path) -> None:
    before = data_file.read_bytes()
    result = devanon.punch_hole(data_file, 1 << 20, 2 << 20)
    assert result.freed_bytes == 2 << 20
    assert result.blocks_before - result.blocks_after == (2 << 20) // 512
    with open(data_file, "rb") as f:
        pages = oracle.data_pages(f.fileno(), 4 << 20, PS)
    assert pages == set(range(256)) | set(range(768, 1024))
    after = data_file.read_bytes()
    assert len(after) == len(before)  # KEEP_SIZE
    assert after[: 1 << 20] == before[: 1 << 20] and after[3 << 20 :] == before[3 << 20 :]
    assert after[1 << 20 : 3 << 20] == bytes(2 << 20)


def test_a_length_past_the_end_punches_to_the_end_at_once(data_file: Path) -> None:
    result = devanon.punch_hole(data_file, 1 << 20, 1 << 62)  # was ~2**35 calls
    assert result.length == 3 << 20
    with open(data_file, "rb") as f:
        assert oracle.data_pages(f.fileno(), 4 << 20, PS) == set(range(256))


def test_punch_hole_takes_an_open_descriptor(data_file: Path) -> None:
    fd = os.open(data_file, os.O_RDWR)
    try:
        result = devanon.punch_hole(fd, 0, 4 << 20)
        assert result.blocks_after == 0 and result.file == f"fd {fd}"
    finally:
        os.close(fd)


def test_where_fallocate_cannot_punch_madv_remove_frees_the_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fallback (``MADV_REMOVE`` through a temporary mapping), judged by SEEK_DATA."""
    import errno

    from devanon import _libc

    def no_punch(*args: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(_libc, "fallocate", no_punch)
    path = Path("/dev/shm") / f"devanon-madv-{os.getpid()}"
    path.write_bytes(b"x" * (4 << 20))
    try:
        result = devanon.punch_hole(path, 1 << 20, 2 << 20)
        assert result.blocks_before - result.blocks_after == (2 << 20) // 512
        with open(path, "rb") as f:
            assert oracle.data_pages(f.fileno(), 4 << 20, PS) == set(range(256)) | set(
                range(768, 1024)
            )
        assert path.read_bytes()[1 << 20 : 3 << 20] == bytes(2 << 20)
    finally:
        path.unlink()


def test_an_anon_whose_fallocate_fails_frees_an_unmapped_page_by_madv_remove(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unmap's one-call punch (``_libc.fallocate_status``) failing takes the fallback, as
    ``punch_hole`` does: the page is freed all the same (SEEK_DATA, st_blocks)."""
    import errno

    from devanon import _libc

    failed: list[int] = []

    def no_punch(fd: int, mode: int, offset: int, length: int) -> int:
        failed.append(offset)
        _libc._ffi.errno = errno.EOPNOTSUPP  # where the C call leaves it
        return -1

    with devanon.Anon(4 * PS) as mem:
        kept, gone = mem.map(0, PS), mem.map(2 * PS, PS)
        kept.view()[:] = b"k" * PS
        gone.view()[:] = b"g" * PS
        monkeypatch.setattr(_libc, "fallocate_status", no_punch)
        gone.close()
        assert failed == [2 * PS, 2 * PS]  # the one call, then punch_range's
        assert oracle.data_pages(mem.fd, 4 * PS, PS) == {0}
        assert mem.resident_bytes() == PS
        assert bytes(kept.view()[:1]) == b"k"
        kept.close()


def test_a_big_release_is_punched_128_mib_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """One call per range, at most 128 MiB each (what each call covers is the only thing
    the kernel does not show afterwards: the calls are watched on their way to it)."""
    from devanon import _libc

    calls: list[tuple[int, int]] = []
    real = _libc.fallocate_status  # (the C function: every punch goes through it)

    def watched(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append((offset, length))
        status: int = real(fd, mode, offset, length)
        return status

    with devanon.Anon(1 << 30) as mem:
        whole = mem.map(0, 1 << 30)
        for offset in range(0, 1 << 30, 64 << 20):
            whole.view()[offset] = 1
        other = mem.map(0, 2 * PS)
        monkeypatch.setattr(_libc, "fallocate_status", watched)
        whole.close()
        assert calls[0] == (2 * PS, 128 << 20)
        assert all(length <= 128 << 20 for _, length in calls)
        assert sum(length for _, length in calls) == (1 << 30) - 2 * PS
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(calls))
        assert len(calls) == 8
        assert oracle.data_pages(mem.fd, 1 << 30, PS) == {0}
        calls.clear()
        other.close()
        assert calls == [(0, 2 * PS)]


@pytest.fixture
def loop_device(disk_dir: Path) -> Iterator[tuple[str, Path]]:
    """A 1 MiB loop device over a file of b"x" (root and losetup, or skipped)."""
    backing = disk_dir / f"devanon-loop-{os.getpid()}"
    backing.write_bytes(b"x" * (1 << 20))
    try:
        found = subprocess.run(
            ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
        )
    except FileNotFoundError:
        found = None
    if found is None or found.returncode:
        backing.unlink()
        pytest.skip(f"no loop device here: {found.stderr.strip() if found else 'no losetup'}")
    device = found.stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        backing.unlink()


def test_a_block_device_is_punched_and_overlaid_by_its_real_size(
    loop_device: tuple[str, Path],
) -> None:
    device, backing = loop_device
    result = devanon.punch_hole(device, 0, 64 << 10)  # its st_size is 0: not "past the end"
    assert result.file == device
    with open(device, "rb") as f:
        assert f.read(64 << 10) == bytes(64 << 10) and f.read(4) == b"xxxx"
    with open(backing, "rb") as f:  # the discard reached the backing file: a hole there
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == 64 << 10
    fd = os.open(device, os.O_RDWR)
    try:  # a descriptor given keeps its position, refused or not
        os.lseek(fd, PS, os.SEEK_SET)
        with pytest.raises(ValueError, match="past the end of fd"):
            devanon.punch_hole(fd, 2 << 20, PS)
        devanon.punch_hole(fd, 0, PS)
        assert os.lseek(fd, 0, os.SEEK_CUR) == PS
    finally:
        os.close(fd)
    with (
        devanon.Anon(4 * PS) as mem,
        mem.map(0, 4 * PS) as m,
        mem.overlay(m.address, device, 1 << 19, 2 * PS),
    ):
        assert bytes(m.view()[:4]) == b"xxxx"


def test_cli_punch_prints_what_the_kernel_freed(
    data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["punch", str(data_file), "1M", "1M"]) == 0
    out = capsys.readouterr().out
    blocks = os.stat(data_file).st_blocks
    assert f"-> {blocks}," in out and "1.0 MiB freed" in out


def test_cli_punch_errors_are_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    run = subprocess.run(
        [sys.executable, "-m", "devanon.cli", "punch", str(missing), "0", "4K"],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and str(missing) in run.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "devanon.cli", "punch", str(missing), "1Q", "4K"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "'1Q'" in bad.stderr


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("0x1000", 4096),
        ("4K", 4096),
        ("2M", 2 << 20),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("3 kb", 3072),
        ("010", 10),
        ("0010K", 10 << 10),
        ("0x1b", 27),
        ("0X1BK", 27 << 10),
        ("12b", 12),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "-1", "1.5G", "12X"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)
