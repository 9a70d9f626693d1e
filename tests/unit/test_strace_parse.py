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
