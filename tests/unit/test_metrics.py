"""The Prometheus page: one series per object, even when two share a name."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest

from devanon.broker import metrics
from devanon.broker.metrics import DaemonCollector
from devanon.broker.server import Daemon


class _Figures:
    """What the collector reads of a daemon."""

    crowded = False
    naps = 0

    def __init__(self, objects: list[dict[str, object]]) -> None:
        self.objects = objects

    def snapshot(self) -> list[dict[str, object]]:
        return self.objects


def _object(name: str, inode: int) -> dict[str, object]:
    figures: dict[str, Any] = dict.fromkeys(
        ("size", "mapped_bytes", "resident_bytes", "clients", "count_runs"), 0
    )
    return {**figures, "freed_bytes": 0, "punch_calls": 0, "name": name, "inode": inode}


def test_an_unlinked_object_and_a_new_one_of_its_name_are_two_series() -> None:
    daemon = _Figures([_object("vm", 41), _object("vm", 42)])  # the first unlinked, in use
    registry = CollectorRegistry()
    registry.register(DaemonCollector(cast(Daemon, daemon)))
    lines = generate_latest(registry).decode().splitlines()
    sizes = [line for line in lines if line.startswith("devanon_object_size_bytes{")]
    assert sorted(sizes) == [
        'devanon_object_size_bytes{inode="41",name="vm"} 0.0',
        'devanon_object_size_bytes{inode="42",name="vm"} 0.0',
    ]


def test_the_textfile_keeps_the_mode_and_group_it_was_given(tmp_path: Path) -> None:
    """An operator's chmod (or chgrp) of the textfile holds across rewrites (it was undone
    within 5 s, and every object's name readable to all again); a new file gets the mode
    the umask gives."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(cast(Daemon, _Figures([]))))
    path = tmp_path / "devanon.prom"
    metrics._write_textfile(str(path), registry, 0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert "devanon_daemon_crowded" in path.read_text()
    path.chmod(0o600)
    group = os.getgid() + 1 if os.geteuid() == 0 else os.getgid()
    os.chown(path, -1, group)
    metrics._write_textfile(str(path), registry, 0o644)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == group
    assert [p.name for p in tmp_path.iterdir()] == ["devanon.prom"]  # no temporary left
