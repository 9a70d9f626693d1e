"""The default workload: real programs starting up, replayed on the Python standard library.

Every machine that has devanon has a Python standard library, so the default root
filesystem is the running interpreter's stdlib directory (``sysconfig``'s ``stdlib``),
without ``site-packages`` / ``dist-packages`` (what is installed there differs from machine
to machine). The default trace is a recording, made with ``devanon trace record``, of these
programs starting up on it, one after the other, each with ``-I -S -B`` (isolated, no site
packages, no bytecode written, so the recording neither depends on nor changes the
machine):

- ``python -m pydoc -k devanon``: searches every module's synopsis (reads the head of every
  module's source, imports every package);
- ``python -m http.server --help``, ``-m unittest --help``, ``-m json.tool --help``,
  ``-m pdb --help``, ``-m timeit --help``: programs parsing their command line.

The trace shipped in the package (``devanon/data/default.trace``) was recorded on CPython
of the version in its ``python`` metadata. On another version its paths and sizes don't
match the stdlib, so the demo records the same programs afresh (strace needed) into a
cache directory: ``python -m devanon.demo.workload FILE`` does exactly that.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

from devanon.record import Recording, record

EXCLUDE = ("site-packages", "dist-packages")
"""Left out of the default image: what is installed there differs between machines."""

PROGRAMS = (
    "-m pydoc -k devanon",
    "-m http.server --help",
    "-m unittest --help",
    "-m json.tool --help",
    "-m pdb --help",
    "-m timeit --help",
)


def python_version() -> str:
    """``CPython 3.11.7``: what the shipped trace must match."""
    return f"{platform.python_implementation()} {platform.python_version()}"


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def shipped_trace() -> Path:
    """The trace shipped in the package."""
    return Path(str(resources.files("devanon.data").joinpath("default.trace")))


def cache_dir() -> Path:
    """Where the demo keeps images and traces it made (on a disk filesystem)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "devanon"


def boot_command(python: str = sys.executable) -> list[str]:
    """The default workload as one shell command: the programs, one after another."""
    quoted = shlex.quote(python)
    steps = [f"{quoted} -I -S -B {p} >/dev/null 2>&1" for p in PROGRAMS]
    return ["/bin/sh", "-c", "; ".join(steps) + "; true"]


def record_default(output: str | os.PathLike[str], python: str = sys.executable) -> Recording:
    """Record the default workload against this interpreter's stdlib into ``output``."""
    with tempfile.TemporaryDirectory(prefix="devanon-boot-") as empty:
        return record(
            boot_command(python),
            stdlib_root(),
            output,
            meta={
                "command": "; ".join(f"python -I -S -B {p}" for p in PROGRAMS),
                "python": python_version(),
                "workload": "the default of devanon demo (devanon.demo.workload)",
            },
            cwd=empty,
        )


if __name__ == "__main__":
    rec = record_default(sys.argv[1] if len(sys.argv) > 1 else "default.trace")
    print(f"{len(rec.reads)} reads, peak RSS {rec.max_rss_bytes} bytes")
