"""Shared fixtures: root-only settings that are always put back, scratch files on real disks."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import IS_ROOT


@pytest.fixture
def sysctl() -> Iterator[Callable[[str, int], None]]:
    """Set /proc/sys values for one test; every one is restored afterwards, pass or fail."""
    saved: dict[Path, str] = {}

    def set_value(name: str, value: int) -> None:
        path = Path("/proc/sys") / name.replace(".", "/")
        saved.setdefault(path, path.read_text())
        path.write_text(f"{value}\n")

    try:
        yield set_value
    finally:
        for path, old in saved.items():
            path.write_text(old)


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A fresh directory on a disk filesystem (not tmpfs), removed afterwards."""
    for base in ("/var/tmp", str(Path.cwd())):
        with contextlib.suppress(OSError):
            kind = subprocess.run(
                ["stat", "-f", "-c", "%T", base], capture_output=True, text=True, check=True
            ).stdout.strip()
            if kind not in ("tmpfs", "ramfs"):
                path = Path(tempfile.mkdtemp(prefix="devanon-test-", dir=base))
                try:
                    yield path
                finally:
                    shutil.rmtree(path, ignore_errors=True)
                return
    pytest.skip("no disk filesystem to test on")


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a filesystem of a given type (ramfs, hugetlbfs) for one test; unmounted after."""
    mounted: list[Path] = []

    def do_mount(fstype: str) -> Path:
        if not IS_ROOT:
            pytest.skip("mounting needs root")
        target = tmp_path / fstype
        target.mkdir()
        subprocess.run(["mount", "-t", fstype, "none", str(target)], check=True)
        mounted.append(target)
        return target

    try:
        yield do_mount
    finally:
        for target in mounted:
            subprocess.run(["umount", "-l", str(target)], check=False)
