"""A trace compiled against an image's manifest: what the guest replays.

Every read becomes pieces (file page, disk block, count). A line naming a file the image
lacks, or a range past the file's end, is **skipped** and reported as a ``Problem`` with its
line number; the replay of the rest goes on. (Lines that do not parse never get here: the
trace parser refuses them before anything starts.)

The plan is kept in flat arrays, not objects, and can be saved to a file and loaded back:
guests are forked from one lean process that loads the plan (a few large buffers, no JSON
to parse), and walking arrays does not write to the shared pages (touching Python objects
would, through their reference counts, and every guest would pay for its copy).
"""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass

from devanon.image import Manifest
from devanon.trace import Trace

_ARRAYS = (
    "read_line",
    "read_file",
    "read_offset",
    "read_length",
    "read_piece",
    "piece_page",
    "piece_block",
    "piece_count",
)
_MAGIC = "devanon-plan 1"


@dataclass(slots=True, frozen=True)
class Problem:
    """A trace line the replay skips, and why."""

    line: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.path}: {self.reason} (skipped)"


class Plan:
    """The reads of a trace as pieces of disk, plus what was skipped.

    Per read: ``read_line``, ``read_file`` (index into ``paths``), ``read_offset``,
    ``read_length`` and ``read_piece`` (its first piece; one extra entry closes the last
    read). Per piece: ``piece_page``, ``piece_block``, ``piece_count``.
    """

    def __init__(self, page_size: int, paths: list[str], info: dict[str, int]) -> None:
        self.page_size = page_size
        self.paths = paths
        self.ids = {p: i for i, p in enumerate(paths)}
        self.problems: list[Problem] = []
        self.distinct_bytes = info.get("distinct_bytes", 0)
        self.total_bytes = info.get("total_bytes", 0)
        self.guest_other_bytes = info.get("guest_other_bytes", 0)
        self.lines = info.get("lines", 0)
        self.read_line = array("q")
        self.read_file = array("q")
        self.read_offset = array("q")
        self.read_length = array("q")
        self.read_piece = array("q", [0])
        self.piece_page = array("q")
        self.piece_block = array("q")
        self.piece_count = array("q")

    @classmethod
    def compile(cls, trace: Trace, manifest: Manifest) -> Plan:
        """Resolve every read of ``trace`` to disk blocks; skip (and note) the bad ones."""
        plan = cls(manifest.block_size, [], {"guest_other_bytes": trace.guest_other_bytes})
        plan.lines = len(trace.reads)
        ps = plan.page_size
        distinct: set[tuple[int, int]] = set()
        for r in trace.reads:
            entry = manifest.files.get(r.path)
            if entry is None:
                plan.problems.append(Problem(r.line, r.path, "no such file in the image"))
                continue
            if r.offset + r.length > entry.size:
                plan.problems.append(
                    Problem(
                        r.line,
                        r.path,
                        f"range [{r.offset}, {r.offset + r.length}) reaches past the end of "
                        f"the file ({entry.size} bytes)",
                    )
                )
                continue
            fid = plan.ids.setdefault(r.path, len(plan.paths))
            if fid == len(plan.paths):
                plan.paths.append(r.path)
            first, last = r.offset // ps, -(-(r.offset + r.length) // ps)
            plan.read_line.append(r.line)
            plan.read_file.append(fid)
            plan.read_offset.append(r.offset)
            plan.read_length.append(r.length)
            for piece in manifest.pieces(r.path, first, last - first):
                plan.piece_page.append(piece.page)
                plan.piece_block.append(piece.block)
                plan.piece_count.append(piece.count)
            plan.read_piece.append(len(plan.piece_page))
            distinct.update((fid, p) for p in range(first, last))
        plan.distinct_bytes = len(distinct) * ps
        plan.total_bytes = sum(plan.read_length)
        return plan

    @property
    def reads(self) -> int:
        """Reads the replay will do (the lines not skipped)."""
        return len(self.read_line)

    def head(self, reads: int) -> Plan:
        """A plan of the first ``reads`` reads only."""
        n = min(reads, self.reads)
        out = Plan(self.page_size, self.paths, {"guest_other_bytes": self.guest_other_bytes})
        for name in _ARRAYS[:4]:
            setattr(out, name, getattr(self, name)[:n])
        out.read_piece = self.read_piece[: n + 1]
        pieces = self.read_piece[n]
        for name in _ARRAYS[5:]:
            setattr(out, name, getattr(self, name)[:pieces])
        out.lines = n
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan (not its problems) to ``path``."""
        head = {
            "magic": _MAGIC,
            "page_size": self.page_size,
            "paths": self.paths,
            "info": {
                "distinct_bytes": self.distinct_bytes,
                "total_bytes": self.total_bytes,
                "guest_other_bytes": self.guest_other_bytes,
                "lines": self.lines,
            },
            "sizes": [len(getattr(self, name)) for name in _ARRAYS],
        }
        with open(path, "wb") as f:
            f.write(json.dumps(head).encode() + b"\n")
            for name in _ARRAYS:
                getattr(self, name).tofile(f)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """A plan written by ``save``; ``ValueError`` naming the file if it is not one."""
        with open(path, "rb") as f:
            try:
                head = json.loads(f.readline())
                if head.get("magic") != _MAGIC:
                    raise ValueError("bad magic")
                plan = cls(int(head["page_size"]), list(head["paths"]), dict(head["info"]))
                for name, n in zip(_ARRAYS, head["sizes"], strict=True):
                    arr = array("q")
                    arr.fromfile(f, int(n))
                    setattr(plan, name, arr)
            except (ValueError, KeyError, TypeError, EOFError) as e:
                raise ValueError(f"{os.fspath(path)!r} is not a devanon plan ({e})") from None
        return plan
