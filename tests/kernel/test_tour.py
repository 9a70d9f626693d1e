"""`devanon tour` (a walk through the device): its figures are the kernel's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devanon.cli import main

MIB = 1 << 20


def test_tour_json_reports_what_the_kernel_holds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tour", "--json", "--size", "8M"]) == 0
    steps = json.loads(capsys.readouterr().out)
    resident = [s["resident_bytes"] for s in steps]
    # created, wrote 4M, mapped again, unmapped A, unmapped B, guest wrote, overlay, release
    assert resident[:8] == [0, 4 * MIB, 4 * MIB, 4 * MIB, 0, 4 * MIB, 0, 0]
    assert [s["map_count"] for s in steps[:5]] == [0, 1, 2, 1, 0]
    assert all(s["data_bytes"] == s["resident_bytes"] for s in steps)
    assert "reads the file: True" in steps[6]["action"]


def test_tour_table_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tour", "--size", "4M"]) == 0
    assert "st_blocks" in capsys.readouterr().out


def test_a_size_the_tour_cannot_halve_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tour", "--size", "12K"]) == 1
    assert "--size 12288 is not a positive multiple of 2 pages" in capsys.readouterr().err


def test_sigterm_mid_tour_leaves_no_file_behind(tmp_path: Path) -> None:
    """SIGTERM unwinds as Ctrl-C does: the tour's scratch file goes."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    tour = subprocess.Popen(
        [sys.executable, "-m", "devanon.cli", "tour", "--size", "1G"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 60
    # Its own file: tempfile first probes the directory with a file it removes at once
    # (gettempdir), which a look at any file at all could catch and then miss.
    while not list(tmp_path.glob("devanon-tour-*")) and time.monotonic() < deadline:
        if tour.poll() is not None:  # ended before it: say how
            raise AssertionError(f"the tour ended ({tour.returncode}): {tour.communicate()[1]!r}")
        time.sleep(0.01)  # until its scratch file exists: in the middle of the work
    assert list(tmp_path.glob("devanon-tour-*")), "the tour never made its scratch file"
    tour.send_signal(signal.SIGTERM)
    _, err = tour.communicate(timeout=60)
    assert tour.returncode == 128 + signal.SIGTERM, err
    assert list(tmp_path.iterdir()) == []
