"""``trace record``'s reading of strace output: positions, preads, mmaps, split lines."""

from __future__ import annotations

from pathlib import Path

from devanon.record import parse_strace


def test_positions_preads_mmaps_and_resumed_lines(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "lib.so").write_bytes(b"\0" * 10000)
    r = str(root)
    log = f"""\
100 openat(AT_FDCWD, "{r}/a.py", O_RDONLY|O_CLOEXEC) = 3<{r}/a.py>
100 read(3<{r}/a.py>, ""..., 4096) = 4096
100 read(3<{r}/a.py>, ""..., 4096) = 100
100 read(3<{r}/a.py>, ""..., 4096) = 0
100 lseek(3<{r}/a.py>, 10, SEEK_SET) = 10
100 read(3<{r}/a.py>, ""..., 5) = 5
100 close(3<{r}/a.py>) = 0
100 pread64(4<{r}/sub/b.pyc>, ""..., 64, 8192) = 64
101 read(5<{r}/c.txt>, <unfinished ...>
100 read(6</etc/passwd>, ""..., 100) = 100
101 <... read resumed>""..., 300) = 300
100 mmap(NULL, 8192, PROT_READ, MAP_PRIVATE|MAP_DENYWRITE, 7<{r}/lib.so>, 0x2000) = 0x7f0000000000
100 mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000100000
100 read(8<{r}/gone>, ""..., 10) = -1 EISDIR (Is a directory)
"""
    rec = parse_strace(log.splitlines(keepends=True), r)
    assert rec.reads == [
        ("a.py", 0, 4096),
        ("a.py", 4096, 100),
        ("a.py", 10, 5),
        ("sub/b.pyc", 8192, 64),
        ("c.txt", 0, 300),
        ("lib.so", 0x2000, 10000 - 0x2000),  # clipped to the file
    ]
    assert rec.outside_root == 1
    assert rec.mmaps == 1
    assert parse_strace(log.splitlines(), r, mmaps=False).mmaps == 0


def test_preadv2_offsets_and_escaped_utf8_paths(tmp_path: Path) -> None:
    r = str(tmp_path)
    log = f"""\
100 preadv2(3<{r}/plain>, [{{iov_base=""..., iov_len=100}}], 1, 8192, RWF_HIPRI) = 100
100 preadv2(3<{r}/plain>, [{{iov_base=""..., iov_len=100}}], 1, 4096, 0) = 100
100 pread64(4<{r}/caf\\303\\251>, ""..., 100, 0) = 100
"""
    rec = parse_strace(log.splitlines(keepends=True), r)
    assert rec.reads == [("plain", 8192, 100), ("plain", 4096, 100), ("café", 0, 100)]


def test_copies_out_of_a_file_at_their_offset_or_the_position(tmp_path: Path) -> None:
    """sendfile, copy_file_range and splice, as strace 6.1 prints them: an offset given is
    used and leaves the position; NULL reads at the position and moves it."""
    r = str(tmp_path)
    i, o = f"3<{r}/in.bin>", "4</tmp/out.bin>"
    log = f"""\
100 openat(AT_FDCWD, "{r}/in.bin", O_RDONLY|O_CLOEXEC) = 3<{r}/in.bin>
100 sendfile({o}, {i}, NULL, 5000) = 5000
100 sendfile({o}, {i}, [10000] => [13000], 3000) = 3000
100 copy_file_range({i}, NULL, {o}, NULL, 2000, 0) = 2000
100 copy_file_range({i}, [50000], {o}, NULL, 1000, 0) = 1000
100 splice({i}, NULL, 6<pipe:[3174614]>, NULL, 700, 0) = 700
100 splice({i}, [60000 => 60300], 6<pipe:[3174614]>, NULL, 300, 0) = 300
100 read({i}, ""..., 10) = 10
100 sendfile({i}, 5</etc/passwd>, NULL, 10) = 10
100 copy_file_range({i}, NULL, {o}, NULL, 2000, 0) = -1 EXDEV (Invalid cross-device link)
"""
    rec = parse_strace(log.splitlines(keepends=True), r)
    assert rec.reads == [
        ("in.bin", 0, 5000),
        ("in.bin", 10000, 3000),
        ("in.bin", 5000, 2000),
        ("in.bin", 50000, 1000),
        ("in.bin", 7000, 700),
        ("in.bin", 60000, 300),
        ("in.bin", 7700, 10),
    ]
    assert rec.outside_root == 1  # the sendfile from /etc/passwd: its input, not its output
