"""``devanon trace record``: the file reads a real command makes, as a trace.

The command runs under ``strace -f -y`` (every process and thread it starts; ``-y`` prints
the path behind each file descriptor). Each successful ``read``/``readv`` (at the
descriptor's position, which ``openat``, ``lseek`` and the reads themselves move),
``pread64``/``preadv`` (at their offset), each copy out of a file by ``sendfile``,
``copy_file_range`` or ``splice`` (at the offset given, else at the position, which it
moves: ``cat`` copies this way) and, unless told not to, each ``mmap`` of a file
(the mapped range, clipped to the file: a guest would fault those pages in) of a file under
``root`` becomes a trace line, the path relative to ``root``. Reads of files outside the
root are counted, not recorded.

Positions are followed per (process, descriptor): threads that share a descriptor's
position, or a forked child reading a descriptor it inherited, can make an offset wrong.
For programs that open, read and close (like Python importing modules) they are exact.

``guest_other_bytes`` (the guest's non-disk memory) is measured as the peak resident set
of the command's largest process (``ru_maxrss`` from ``wait4``), unless given. A process's
``ru_maxrss`` includes the memory it had before ``exec`` (the kernel keeps the old mm's
high-water mark in ``exec_mmap``), i.e. the resident set of whoever forked it: so strace is
started by a small helper interpreter, not by this (larger) process, and the figure has
that helper's resident set (~9 MiB) as its floor.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from devanon.anon import PAGE_SIZE
from devanon.trace import check_path, distinct_bytes, format_trace

TRACED = (
    "openat,open,creat,read,pread64,readv,preadv,preadv2,lseek,mmap,close,"
    "sendfile,?sendfile64,copy_file_range,splice"
)
_COPIES = frozenset({"sendfile", "sendfile64", "copy_file_range", "splice"})
"""Calls that read a file into another descriptor without a buffer of the caller's."""

_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+|0x[0-9a-fA-F]+)(?:<(.*)>)?")
_FD = re.compile(r"^(-?\d+)<(.*?)>(?:, |$)")
_GIVEN_OFFSET = re.compile(r"^\[(\d+)")
"""A copy's input offset, when given: ``[10000] => [13000]`` (sendfile), ``[50000]``."""
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)")


class StraceMissing(FileNotFoundError):
    """strace is not installed."""


@dataclass(slots=True)
class Recording:
    """A recorded trace's reads and what else was seen."""

    reads: list[tuple[str, int, int]] = field(default_factory=list)
    outside_root: int = 0
    mmaps: int = 0
    max_rss_bytes: int = 0
    exit_code: int = 0


def _unescape(path: str) -> str:
    """strace's C escapes undone: ``\\303\\251`` are the bytes of UTF-8 "é", not two
    characters."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(path):
        out += path[pos : m.start()].encode("utf-8", "surrogateescape")
        code = m.group(1)
        if code.startswith("x"):
            out.append(int(code[1:], 16))
        elif code.isdigit():
            out.append(int(code, 8))
        else:
            out += {"n": "\n", "t": "\t"}.get(code, code).encode()
        pos = m.end()
    out += path[pos:].encode("utf-8", "surrogateescape")
    return out.decode("utf-8", "surrogateescape")


def _joined(lines: Iterator[str]) -> Iterator[str]:
    """strace -f lines with ``<unfinished ...>`` / ``<... resumed>`` halves put together."""
    pending: dict[str, str] = {}
    for line in lines:
        line = line.rstrip("\n")
        pid, _, rest = line.partition(" ")
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        m = re.match(r"\s*<\.\.\. \w+ resumed>\s?(.*)", rest)
        if m:
            head = pending.pop(pid, None)
            if head is None:
                continue
            tail = m.group(1)
            sep = "" if head.endswith("(") or tail.startswith(")") else " "
            yield f"{pid} {head}{sep}{tail}"
            continue
        yield line


def parse_strace(
    lines: Iterator[str] | Sequence[str], root: str, *, mmaps: bool = True
) -> Recording:
    """The reads under ``root`` in ``strace -f -y`` output (see the module doc)."""
    root = os.path.realpath(root).rstrip("/") + "/"
    rec = Recording()
    pos: dict[tuple[str, int], int] = {}
    sizes: dict[str, int] = {}
    for line in _joined(iter(lines)):
        m = _LINE.match(line)
        if not m:
            continue
        pid, call, args, ret_text, _ = m.groups()
        ret = int(ret_text, 0)
        if call in ("openat", "open", "creat"):
            if ret >= 0:
                pos[(pid, ret)] = 0
            continue
        fm = _FD.match(args) if call != "mmap" else None
        if call in ("sendfile", "sendfile64") and fm is not None:  # (out_fd, in_fd, ...)
            args = args[fm.end() :]
            fm = _FD.match(args)
        elif call == "mmap":
            parts = args.split(", ")
            if len(parts) < 6 or "<" not in parts[4] or ret < 0:
                continue
            fm = _FD.match(parts[4])
        if fm is None:
            continue
        fd, path = int(fm.group(1)), _unescape(fm.group(2)).removesuffix(" (deleted)")
        key = (pid, fd)
        if call == "close":
            pos.pop(key, None)
            continue
        if call == "lseek":
            if ret >= 0:
                pos[key] = ret
            continue
        rest = args[fm.end() :]
        offset: int | None = None
        length = ret
        if call in ("read", "readv"):
            offset = pos.get(key, 0)
            if ret > 0:
                pos[key] = offset + ret
        elif call in ("pread64", "preadv"):
            offset = int(_number_at(rest, -1))
        elif call == "preadv2":  # (fd, iov, iovcnt, offset, flags)
            offset = int(_number_at(rest, -2))
        elif call in _COPIES:  # the input descriptor, then its offset or NULL
            given = _GIVEN_OFFSET.match(rest)
            if given is not None:
                offset = int(given.group(1))
            else:
                offset = pos.get(key, 0)
                if ret > 0:
                    pos[key] = offset + ret
        elif call == "mmap":
            if not mmaps:
                continue
            parts = args.split(", ")
            length, offset = int(parts[1], 0), int(parts[5], 0)
        if offset is None or length <= 0:
            continue
        if not path.startswith(root):
            rec.outside_root += 1
            continue
        rel = path[len(root) :]
        if check_path(rel) is not None:
            rec.outside_root += 1
            continue
        if call == "mmap":
            if path not in sizes:
                try:
                    sizes[path] = os.stat(path).st_size
                except OSError:
                    sizes[path] = 0
            length = min(length, sizes[path] - offset)
            if length <= 0:
                continue
            rec.mmaps += 1
        rec.reads.append((rel, offset, length))
    return rec


def _number_at(args: str, index: int) -> str:
    """The argument at ``index`` (from the end) of a call's argument text."""
    fields = args.rstrip().rsplit(",", -index)
    value = fields[index].strip() if len(fields) >= -index else ""
    return value if value else "0"


def record(
    command: Sequence[str],
    root: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    meta: Mapping[str, object] | None = None,
    other_bytes: int | None = None,
    mmaps: bool = True,
    cwd: str | None = None,
) -> Recording:
    """Run ``command`` under strace and write the trace of its reads under ``root``."""
    strace = shutil.which("strace")
    if strace is None:
        raise StraceMissing(
            2, "strace is not installed: `apt-get install strace` (scripts/setup does it)"
        )
    if not command:
        raise ValueError("no command to record: give it after `--`")
    root_s = os.fspath(root)
    if not os.path.isdir(root_s):
        raise NotADirectoryError(20, f"root {root_s!r} is not a directory")
    program = command[0]
    if os.sep in program:  # a path, from cwd
        found = os.access(os.path.join(cwd or ".", program), os.X_OK)
    else:
        found = shutil.which(program) is not None
    if not found:
        raise FileNotFoundError(2, f"command {program!r} not found (or not executable)")
    with tempfile.NamedTemporaryFile(prefix="devanon-strace-", suffix=".txt") as log:
        base = [strace, "-f", "-qq", "-y", "-s", "0", "-e", f"trace={TRACED}", "-o", log.name]
        if _has_seccomp_bpf(strace):  # the command runs once: it may not be safe twice
            base.append("--seccomp-bpf")
        code, rss = _run([*base, "--", *command], cwd)
        with open(log.name, encoding="utf-8", errors="surrogateescape") as f:
            rec = parse_strace(f, root_s, mmaps=mmaps)
    rec.exit_code = code
    rec.max_rss_bytes = rss
    other = other_bytes if other_bytes is not None else -(-rss // PAGE_SIZE) * PAGE_SIZE
    header: dict[str, object] = {
        "command": " ".join(command),
        "root": os.path.realpath(root_s),
        "recorded_with": "strace -f -y (devanon trace record)",
        "mmaps": "recorded as reads of the mapped range" if mmaps else "not recorded",
        "reads": len(rec.reads),
        "distinct_bytes": distinct_bytes(rec.reads, PAGE_SIZE),
        "outside_root_reads": rec.outside_root,
        "guest_other_bytes": other,
        "guest_other_source": "given"
        if other_bytes is not None
        else "peak RSS of the command's largest process (ru_maxrss)",
        "exit_code": code,
        **(meta or {}),
    }
    with open(output, "w", encoding="utf-8") as f:
        f.write(format_trace(rec.reads, header))
    return rec


_HELPER = """
import os, sys
out = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(out)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(out, b"%d %d" % (os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024))
"""


def _has_seccomp_bpf(strace: str) -> bool:
    """Whether this strace takes ``--seccomp-bpf`` (5.3 and later: far less overhead)."""
    probe = [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=none", "-o", os.devnull, "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def _run(argv: list[str], cwd: str | None) -> tuple[int, int]:
    """Run ``argv`` from the small helper: (exit code, peak RSS of its largest process).
    The helper, strace and the command are a process group of their own, killed if this
    process is interrupted (Ctrl-C, SIGTERM) rather than left running."""
    r, w = os.pipe()
    try:
        helper = [sys.executable, "-I", "-S", "-c", _HELPER, str(w), *argv]
        proc = subprocess.Popen(
            helper, cwd=cwd, stdin=subprocess.DEVNULL, pass_fds=(w,), start_new_session=True
        )
        os.close(w)
        w = -1
        try:
            answer = os.read(r, 100).split()
            proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if len(answer) != 2:
        return proc.returncode or 127, 0
    return int(answer[0]), int(answer[1])
