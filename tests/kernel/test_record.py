"""``devanon trace record``: strace sees a real program's reads, the trace says them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from devanon.cli import main
from devanon.trace import load_trace

needs_strace = pytest.mark.skipif(
    shutil.which("strace") is None, reason="needs strace (scripts/setup installs it)"
)

PROGRAM = """
import os
with open("a.txt", "rb") as f:
    f.read(5)
    f.read(7)
fd = os.open("sub/b.bin", os.O_RDONLY)
os.pread(fd, 100, 8192)
os.close(fd)
open("/etc/hostname", "rb").read()
"""


@needs_strace
def test_records_reads_relative_to_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"x" * 100)
    (root / "sub" / "b.bin").write_bytes(b"y" * 10000)
    out = tmp_path / "t.trace"
    program = f"import os\nos.chdir({str(root)!r})\n{PROGRAM}"
    argv = ["trace", "record", "-o", str(out), "--root", str(root), "--other-bytes", "1M"]
    code = main([*argv, "--", sys.executable, "-I", "-S", "-c", program])
    assert code == 0
    trace = load_trace(out)
    reads = [(r.path, r.offset, r.length) for r in trace.reads]
    # Python's buffered reader asks for more than 5 bytes and gets the whole small file
    assert reads[0][:2] == ("a.txt", 0) and sum(n for p, _, n in reads if p == "a.txt") == 100
    assert ("sub/b.bin", 8192, 100) in reads
    assert all(not p.startswith("/") for p, _, _ in reads)
    assert trace.guest_other_bytes == 1 << 20
    assert int(trace.meta["outside_root_reads"]) > 0  # /etc/hostname, the interpreter ...
    assert "reads of 2 files" in capsys.readouterr().out


COPIER = """
import os
fi = os.open("in.bin", os.O_RDONLY)
fo = os.open(os.environ["OUT"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
os.sendfile(fo, fi, None, 5000)
os.sendfile(fo, fi, 10000, 3000)
os.copy_file_range(fi, fo, 2000)
os.copy_file_range(fi, fo, 1000, 50000)
r, w = os.pipe()
os.splice(fi, w, 700)
os.read(fi, 10)
"""


@needs_strace
def test_records_copies_out_of_files(tmp_path: Path) -> None:
    """A program that copies with sendfile, copy_file_range and splice (as ``cat`` does)
    reads what it copies: the trace has those bytes, at the right offsets."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.bin").write_bytes(b"z" * 100_000)
    out = tmp_path / "t.trace"
    program = f"import os\nos.chdir({str(root)!r})\n{COPIER}"
    env = f"OUT={tmp_path / 'copy.bin'}"
    argv = ["trace", "record", "-o", str(out), "--root", str(root), "--other-bytes", "1M"]
    code = main([*argv, "--", "env", env, sys.executable, "-I", "-S", "-c", program])
    assert code == 0
    reads = [(r.path, r.offset, r.length) for r in load_trace(out).reads]
    assert reads == [
        ("in.bin", 0, 5000),
        ("in.bin", 10000, 3000),
        ("in.bin", 5000, 2000),
        ("in.bin", 50000, 1000),
        ("in.bin", 7000, 700),
        ("in.bin", 7700, 10),
    ]


@needs_strace
def test_measures_guest_other_bytes(tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    assert main(["trace", "record", "-o", str(out), "--root", str(tmp_path), "--", "true"]) == 0
    trace = load_trace(out)
    assert trace.reads == []
    assert trace.guest_other_bytes > 0  # the peak RSS of `true` (and of strace)
    assert "ru_maxrss" in trace.meta["guest_other_source"]


def test_stats_reports_skipped_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "f").write_bytes(b"z" * 10)
    t = tmp_path / "t.trace"
    t.write_text("f\t0\t10\nf\t5\t10\nnope\t0\t1\n")
    assert main(["trace", "stats", str(t), "--rootfs", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert "3 reads" in out and "1 reads replay, 2 skipped" in out
    assert "line 2: f: range [5, 15) reaches past the end of the file (10 bytes) (skipped)" in out
    assert "line 3: nope: no such file in the image (skipped)" in out


def test_record_without_a_command_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    assert main(["trace", "record", "-o", str(tmp_path / "t"), "--"]) == 1
    assert "no command to record" in capsys.readouterr().err


@needs_strace
def test_a_failing_command_runs_once_and_a_missing_one_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    script = tmp_path / "once.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {runs}\nexit 3\n")
    script.chmod(0o755)
    out = tmp_path / "t.trace"
    assert (
        main(["trace", "record", "-o", str(out), "--root", str(tmp_path), "--", str(script)]) == 0
    )
    assert runs.read_text() == "ran\n"  # once, though it failed (it may not be safe twice)
    assert load_trace(out).meta["exit_code"] == "3"
    missing = tmp_path / "no-such-command"
    assert main(["trace", "record", "-o", str(out), "--", str(missing)]) == 1
    assert f"command {str(missing)!r} not found" in capsys.readouterr().err
