"""`devanon tour` (a walk through the device): its figures are the kernel's."""

from __future__ import annotations

import json

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
