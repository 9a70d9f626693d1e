"""src/devanon/_cdefs.py is what scripts/build_cdefs.py makes of its declarations."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import devanon._cdefs

BUILDER = Path(__file__).resolve().parents[2] / "scripts" / "build_cdefs.py"


def _without_version(text: str) -> str:
    """The module less cffi's own version stamp (another cffi writes another)."""
    return re.sub(r"_version = 0x[0-9a-fA-F]+", "_version = ?", text)


def test_the_committed_module_matches_the_declarations(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("build_cdefs", BUILDER)
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    fresh = builder.build(tmp_path / "_cdefs.py").read_text()
    committed = Path(devanon._cdefs.__file__).read_text()
    assert _without_version(committed) == _without_version(fresh), (
        "src/devanon/_cdefs.py is out of date: run scripts/build_cdefs.py"
    )
