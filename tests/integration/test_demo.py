"""``devanon demo`` end to end on a small workload: the JSON, the plot, the errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import needs_root

from devanon.cli import main
from devanon.demo import DemoOptions
from devanon.demo import run as run_demo
from devanon.trace import format_trace
from devanon.ubd import Mode

PS = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
KEYS = (
    "host_bytes_total",
    "file_bytes",
    "shmem_bytes",
    "anon_bytes",
    "per_guest_bytes",
    "guests",
    "density",
)


@pytest.fixture
def small(tmp_path: Path, disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(disk_dir / "cache"))  # images go here
    root = tmp_path / "root"
    root.mkdir()
    reads = []
    for i in range(8):
        data = bytes([i + 1]) * (300 * PS + 7)
        (root / f"f{i}").write_bytes(data)
        reads += [(f"f{i}", off, min(20000, len(data) - off)) for off in range(0, len(data), 20000)]
    trace = tmp_path / "t.trace"
    trace.write_text(format_trace(reads, {"guest_other_bytes": 3 * MIB}))
    return root, trace


@needs_root
def test_json_has_every_figure_per_mode(
    small: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, trace = small
    png = tmp_path / "demo.png"
    argv = ["demo", "--rootfs", str(root), "--trace", str(trace), "--guests", "3"]
    argv += ["--memory", "32M", "--budget", "64M", "--json", "--plot", str(png)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for mode in ("copy", "mmap"):
        m = result["modes"][mode]
        assert all(isinstance(m[k], int) for k in KEYS)
        assert m["guests"] == 3 and m["density_measured"]
        assert m["host_bytes_total"] == m["file_bytes"] + m["shmem_bytes"] + m["anon_bytes"]
        assert [p["guests"] for p in m["curve"]] == [1, 2, 3]
        assert m["density_detail"]["oom_kills"] >= 1
    copy, mmap = result["modes"]["copy"], result["modes"]["mmap"]
    assert result["savings"] == pytest.approx(
        1 - mmap["host_bytes_total"] / copy["host_bytes_total"]
    )
    distinct = result["workload"]["distinct_bytes"]
    assert distinct == 8 * 301 * PS
    assert copy["shmem_bytes"] - mmap["shmem_bytes"] >= 3 * distinct - MIB
    assert result["checks"]["one_guest_mmap_le_copy_minus_90pct_distinct"]["ok"]
    assert mmap["density"] > copy["density"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_a_cgroup_it_measures_st_blocks_and_says_so(
    small: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, trace = small
    import devanon.demo as demo
    import devanon.demo.runs as demo_run

    def no_cgroup() -> tuple[bool, str]:
        return False, "making a memory cgroup needs root"

    monkeypatch.setattr(demo, "have_cgroup", no_cgroup)
    monkeypatch.setattr(demo_run, "have_cgroup", no_cgroup)
    options = DemoOptions(
        guests=2,
        modes=(Mode.COPY, Mode.MMAP),
        rootfs=str(root),
        trace=str(trace),
        memory=32 * MIB,
        budget=64 * MIB,
        json=True,
    )
    result = run_demo(options)
    capsys.readouterr()
    assert "st_blocks" in result["measured_by"] and "mincore" in result["measured_by"]
    distinct = result["workload"]["distinct_bytes"]
    copy, mmap = result["modes"]["copy"], result["modes"]["mmap"]
    assert copy["file_bytes"] == mmap["file_bytes"] == distinct  # mincore of the image
    other = 3 * MIB
    assert copy["shmem_bytes"] == 2 * (other + distinct)  # st_blocks of the Anons
    assert mmap["shmem_bytes"] == 2 * other
    assert copy["density_measured"] is False and mmap["density"] > copy["density"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["--rootfs", "/nonexistent-root", "--trace", "TRACE"],
            "'/nonexistent-root' is not a directory",
        ),
        (
            ["--rootfs", "ROOT", "--trace", "/nonexistent.trace"],
            "'/nonexistent.trace' does not exist",
        ),
        (
            ["--rootfs", "ROOT", "--trace", "BAD"],
            "bad.trace:2: expected path<TAB>offset<TAB>length",
        ),
        (["--rootfs", "ROOT", "--trace", "OTHER"], "no line of"),
        (["--rootfs", "ROOT"], "--rootfs needs --trace"),
        (["--guests", "0"], "--guests must be at least 1, not 0"),
        (["--rootfs", "ROOT", "--trace", "TRACE", "--memory", "1M"], "cannot hold a guest"),
        (["--plot", "/nonexistent-dir/x.png"], "cannot write in /nonexistent-dir"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(
    small: tuple[Path, Path],
    tmp_path: Path,
    args: list[str],
    words: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, trace = small
    (tmp_path / "bad.trace").write_text("f0\t0\t10\nf0 0 10\n")
    (tmp_path / "other.trace").write_text("elsewhere\t0\t10\n")
    subst = {
        "ROOT": str(root),
        "TRACE": str(trace),
        "BAD": str(tmp_path / "bad.trace"),
        "OTHER": str(tmp_path / "other.trace"),
    }
    assert main(["demo", *[subst.get(a, a) for a in args]]) == 1
    assert words in capsys.readouterr().err


@needs_root
def test_sigterm_cleans_up_as_ctrl_c_does(small: tuple[Path, Path], disk_dir: Path) -> None:
    """A timeout or a service manager stops the demo with SIGTERM: no cgroup, no scratch
    directory and no process of it is left."""
    from devanon.cgroups import find_parent

    root, trace = small
    _, parent = find_parent()
    scratch = Path("/var/tmp")
    before = set(scratch.glob("devanon-demo-*"))
    env = {**os.environ, "XDG_CACHE_HOME": str(disk_dir / "cache")}
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devanon.cli",
            "demo",
            "--rootfs",
            str(root),
            "--trace",
            str(trace),
            "--guests",
            "6",
            "--memory",
            "32M",
            "--budget",
            "256M",
            "--json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 60
    while not list(parent.glob("devanon-demo-*")) and time.monotonic() < deadline:
        time.sleep(0.02)  # until the runs have a cgroup: the middle of the work
    assert list(parent.glob("devanon-demo-*")), "the demo never made its cgroup"
    demo.send_signal(signal.SIGTERM)
    _, err = demo.communicate(timeout=60)
    assert demo.returncode == 128 + signal.SIGTERM, err
    assert list(parent.glob("devanon-demo-*")) == []
    assert set(scratch.glob("devanon-demo-*")) == before
