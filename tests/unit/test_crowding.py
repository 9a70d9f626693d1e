"""CrowdWatch reads the run queue from a loadavg file; these use files of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from devanon.broker import crowding
from devanon.broker.crowding import CrowdWatch, runnable_tasks


def loadavg(tmp_path: Path, running: int) -> str:
    path = tmp_path / "loadavg"
    path.write_text(f"0.52 0.58 0.59 {running}/467 12345\n")
    return str(path)


def test_runnable_tasks_reads_the_running_field(tmp_path: Path) -> None:
    assert runnable_tasks(loadavg(tmp_path, 7)) == 7


@pytest.mark.parametrize("text", ["", "0.1 0.2 0.3\n", "0.1 0.2 0.3 x/9 1\n"])
def test_runnable_tasks_is_none_for_what_it_cannot_read(tmp_path: Path, text: str) -> None:
    path = tmp_path / "loadavg"
    path.write_text(text)
    assert runnable_tasks(str(path)) is None
    assert runnable_tasks(str(tmp_path / "missing")) is None


def test_the_real_run_queue_counts_this_process() -> None:
    running = runnable_tasks()
    assert running is not None and running >= 1


@pytest.mark.parametrize(("running", "crowded"), [(1, False), (2, False), (3, True), (9, True)])
def test_crowded_when_the_others_could_fill_every_cpu(
    tmp_path: Path, running: int, crowded: bool
) -> None:
    # The caller is one of the running tasks: with 2 CPUs, 2 others fill them.
    assert CrowdWatch(loadavg(tmp_path, running), cpus=2).crowded(0.0) is crowded


def test_unknown_run_queue_is_not_crowded(tmp_path: Path) -> None:
    assert CrowdWatch(str(tmp_path / "missing"), cpus=1).crowded(0.0) is False


def test_one_look_is_trusted_for_check_s(tmp_path: Path) -> None:
    path = loadavg(tmp_path, 1)
    watch = CrowdWatch(path, cpus=1)
    assert not watch.crowded(100.0)
    loadavg(tmp_path, 5)
    assert not watch.crowded(100.0 + crowding.CHECK_S / 2)
    assert watch.crowded(100.0 + crowding.CHECK_S)


def test_last_is_what_the_last_look_said(tmp_path: Path) -> None:
    watch = CrowdWatch(loadavg(tmp_path, 4), cpus=1)
    assert watch.last is False  # no look yet
    assert watch.crowded(0.0) and watch.last
