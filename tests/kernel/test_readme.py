"""The README's examples run as written (the broker's against a daemon of their own)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert len(blocks) >= 2, "README.md lost its python examples"
    socket = tmp_path / "dv.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "devanon.cli", "serve", "--socket", str(socket)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        monkeypatch.setenv("DEVANON_SOCKET", str(socket))
        for block in blocks:
            exec(compile(block, str(README), "exec"), {})
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=10) == 0
    assert not os.path.exists(socket)
