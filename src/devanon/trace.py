"""Traces: what a recorded boot read, one read per line (DESIGN.md).

Text, one read per line, ``path<TAB>offset<TAB>length``, the path relative to the root
filesystem the trace was recorded against. Lines starting with ``#`` are comments;
``# key: value`` comments carry metadata, e.g. ``# guest_other_bytes: 41943040`` (the
guest's memory that is not disk data: kernel, processes).

A line that does not parse is refused (``TraceError`` naming the file and line) before any
replay starts. A line that parses but names a file the root lacks, or a range past its end,
is the replay's business: it is skipped and reported (``devanon.guest.plan``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

_META = re.compile(r"#\s*([A-Za-z_][\w.-]*)\s*:\s*(.*?)\s*$")

INT_KEYS = ("guest_other_bytes",)
"""Metadata keys whose values must be integers (checked when the trace is parsed)."""


_MAX_FILE = 1 << 63
"""Bytes no file can reach (off_t holds 2**63 - 1)."""
_MAX_DIGITS = 24
"""Digits beyond which a number is surely past ``_MAX_FILE`` (and int() may refuse it)."""


class TraceError(ValueError):
    """A trace that does not parse; the message names the source and line."""


@dataclass(slots=True, frozen=True)
class TraceRead:
    """One recorded read: ``length`` bytes of ``path`` (relative) from ``offset``."""

    line: int
    path: str
    offset: int
    length: int


@dataclass(slots=True)
class Trace:
    """A parsed trace: its reads in order and its metadata."""

    reads: list[TraceRead]
    meta: dict[str, str] = field(default_factory=dict)
    source: str = "<trace>"

    @property
    def guest_other_bytes(self) -> int:
        """The guest's non-disk memory the trace states (0 if it states none)."""
        return _number(self.meta.get("guest_other_bytes", "0"))

    def distinct_bytes(self, page_size: int) -> int:
        """Bytes of the distinct pages the reads touch (what a page cache would hold)."""
        return distinct_bytes(((r.path, r.offset, r.length) for r in self.reads), page_size)

    def total_bytes(self) -> int:
        """Bytes read, counting every read (repeats included)."""
        return sum(r.length for r in self.reads)


def distinct_bytes(reads: Iterable[tuple[str, int, int]], page_size: int) -> int:
    """Bytes of the distinct pages that reads ``(path, offset, length)`` touch: the union
    of their page ranges, file by file (never a walk over the pages)."""
    ranges = sorted((p, o // page_size, -(-(o + n) // page_size)) for p, o, n in reads)
    pages, path, stop = 0, None, 0
    for p, first, last in ranges:
        if p != path:
            path, stop = p, 0
        if last > stop:
            pages += last - max(first, stop)
            stop = last
    return pages * page_size


def check_path(path: str) -> str | None:
    """Why ``path`` cannot be a trace path (None if it can): relative, no ``..``, no tabs."""
    if not path:
        return "empty path"
    if "\t" in path or "\n" in path or "\0" in path:
        return f"path {path!r} holds a tab, newline or NUL"
    p = PurePosixPath(path)
    if p.is_absolute():
        return f"path {path!r} is absolute; trace paths are relative to the root"
    if ".." in p.parts:
        return f"path {path!r} climbs out of the root with '..'"
    return None


def parse_trace(text: str, source: str = "<trace>") -> Trace:
    """Parse trace text; ``TraceError`` names ``source`` and the line of the first bad line."""
    reads: list[TraceRead] = []
    meta: dict[str, str] = {}
    # split on "\n" only: str.splitlines() also breaks at \f, \v, \x1c-\x1e, \x85, \u2028...
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if line.startswith("#"):
            m = _META.fullmatch(line)
            if m:
                key, value = m.groups()
                if key in INT_KEYS and not (_is_int(value) and _number(value) < _MAX_FILE):
                    raise TraceError(
                        f"{source}:{lineno}: {key} must be an integer below 2**63, not "
                        f"{value[:40]!r}"
                    )
                meta[key] = value
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise TraceError(
                f"{source}:{lineno}: expected path<TAB>offset<TAB>length, got {len(fields)} "
                f"field(s): {line!r}"
            )
        path, offset_text, length_text = fields
        why = check_path(path)
        if why:
            raise TraceError(f"{source}:{lineno}: {why}")
        if not (_is_int(offset_text) and _is_int(length_text)):
            raise TraceError(
                f"{source}:{lineno}: offset and length must be integers, got "
                f"{offset_text!r} and {length_text!r}"
            )
        offset, length = _number(offset_text), _number(length_text)
        if offset < 0 or length <= 0:
            raise TraceError(
                f"{source}:{lineno}: offset must be >= 0 and length > 0, got {offset} and {length}"
            )
        if offset + length >= _MAX_FILE:
            raise TraceError(
                f"{source}:{lineno}: offset {offset} + length {length} is past what a file "
                "can hold (2**63 bytes)"
            )
        reads.append(TraceRead(lineno, path, offset, length))
    return Trace(reads, meta, source)


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and parse a trace file; a missing file is a ``FileNotFoundError`` naming it."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(2, f"trace file {name!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise TraceError(f"{name}: not a text trace ({e.reason} at byte {e.start})") from None
    return parse_trace(text, name)


def format_trace(
    reads: Iterable[tuple[str, int, int]], meta: Mapping[str, object] | None = None
) -> str:
    """Trace text: the metadata comments, then one ``path\\toffset\\tlength`` line per read."""
    lines = ["# devanon trace: path<TAB>offset<TAB>length, paths relative to the root"]
    for key, value in (meta or {}).items():
        text = " ".join(str(value).split())  # one line: no newline, tab or other break
        lines.append(f"# {key}: {text}")
    for path, offset, length in reads:
        why = check_path(path)
        if why:
            raise ValueError(why)
        lines.append(f"{path}\t{offset}\t{length}")
    return "\n".join(lines) + "\n"


def _number(digits: str) -> int:
    """The value of a run of ASCII digits; past ``_MAX_DIGITS`` significant ones, a value
    surely past any file (``int()`` refuses thousands of digits)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else _MAX_FILE << 1


def _is_int(text: str) -> bool:
    return text.isascii() and text.isdigit()
