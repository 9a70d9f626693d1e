"""A real daemon (`devanon serve` in its own process) for each test, stopped afterwards."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_daemon import Served, start_daemon


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory any uid can reach (the other-uid tests connect from 'nobody')."""
    path = Path(tempfile.mkdtemp(prefix="devanon-broker-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(socket_dir: Path) -> Iterator[Served]:
    served = start_daemon(str(socket_dir / "dv.sock"), "--socket-mode", "0666")
    try:
        yield served
    finally:
        assert served.stop() == 0
