"""Memory cgroups, v1 or v2, whichever controller this host mounts.

A measurement gets a fresh cgroup of its own, made under the cgroup this process is in
(so whatever limits the caller lives under still hold), and removed afterwards.

Facts the code relies on:

- v1 (``cgroup`` with the ``memory`` option, e.g. ``/sys/fs/cgroup/memory``): a child
  cgroup may be made under one that has processes; ``memory.stat`` has ``total_*``
  (hierarchical) figures; ``memory.oom_control`` counts ``oom_kill`` (Linux >= 4.13);
  the limit is ``memory.limit_in_bytes``. ``memory.usage_in_bytes`` is a fuzzy figure
  (cgroup-v1/memory.rst, 5.5): the exact one is rss + cache from ``memory.stat``.
- v2 (``cgroup2``): "no internal processes": a cgroup with processes cannot hand the
  memory controller to children (unless it is the root), so the new cgroup is made under
  the nearest ancestor whose ``cgroup.subtree_control`` has ``memory``. ``memory.stat``
  ``file`` includes ``shmem``; ``memory.events`` counts ``oom_kill``; the limit is
  ``memory.max`` (and ``memory.swap.max`` 0, so nothing hides in swap).
- Page cache is charged to the cgroup of the process that first touched it, and stays
  charged after that process leaves; on rmdir it moves to the parent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class CgroupUnavailable(OSError):
    """No memory cgroup can be made here (not root, no controller, ...)."""


@dataclass(slots=True, frozen=True)
class Mount:
    """A cgroup filesystem mount: its version, root (inside the hierarchy) and path."""

    version: int
    root: str
    path: str


def parse_mountinfo(text: str) -> list[Mount]:
    """The memory-cgroup mounts in ``/proc/self/mountinfo`` text (v1 memory, then v2)."""
    v1: list[Mount] = []
    v2: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        root, path = fields[3], fields[4].replace("\\040", " ")
        if fstype == "cgroup" and "memory" in options.split(","):
            v1.append(Mount(1, root, path))
        elif fstype == "cgroup2":
            v2.append(Mount(2, root, path))
    return v1 + v2


def parse_proc_cgroup(text: str) -> dict[int, str]:
    """``{1: path of the memory controller's v1 cgroup, 2: the v2 path}`` of a process."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            out[2] = path
        elif "memory" in controllers.split(","):
            out[1] = path
    return out


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, memory.oom_control) as a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def inside(mount: Mount, path: str) -> Path:
    """The directory of cgroup ``path`` (as /proc/PID/cgroup names it) under ``mount``."""
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        path = path[len(mount.root) :] or "/"
    return Path(mount.path) / path.lstrip("/")


def find_parent() -> tuple[int, Path]:
    """Version and directory under which this process may make a memory cgroup.

    ``CgroupUnavailable`` saying why when there is none.
    """
    if os.geteuid() != 0:
        raise CgroupUnavailable(errno.EPERM, "making a memory cgroup needs root")
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mounts = parse_mountinfo(f.read())
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        own = parse_proc_cgroup(f.read())
    for mount in mounts:
        if mount.version not in own:
            continue
        here = inside(mount, own[mount.version])
        if mount.version == 1:
            if (here / "memory.stat").exists():
                return 1, here
            continue
        for candidate in (here, *here.parents):
            if not str(candidate).startswith(mount.path):
                break
            control = candidate / "cgroup.subtree_control"
            with contextlib.suppress(OSError):
                if "memory" in control.read_text().split():
                    return 2, candidate
    raise CgroupUnavailable(
        errno.ENOENT, "no memory cgroup controller (v1 or v2) that this process can use"
    )


class Cgroup:
    """A memory cgroup this process made; ``remove()`` (or ``with``) takes it away."""

    def __init__(self, version: int, path: Path) -> None:
        self.version = version
        self.path = path

    @classmethod
    def create(cls, name: str, *, limit: int | None = None) -> Cgroup:
        """A new cgroup ``name`` (made unique) under ``find_parent()``, with ``limit``."""
        version, parent = find_parent()
        path = parent / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir()
        group = cls(version, path)
        try:
            if limit is not None:
                group.set_limit(limit)
        except BaseException:
            group.remove()
            raise
        return group

    @property
    def procs_file(self) -> Path:
        """Write a pid here to move that process into the cgroup."""
        return self.path / "cgroup.procs"

    def add(self, pid: int) -> None:
        self.procs_file.write_text(f"{pid}\n")

    def procs(self) -> list[int]:
        return [int(x) for x in self.procs_file.read_text().split()]

    def set_limit(self, nbytes: int) -> None:
        """Hard limit on the memory charged to the cgroup (no swap to spill into)."""
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(f"{nbytes}\n")
        else:
            (self.path / "memory.max").write_text(f"{nbytes}\n")
            with contextlib.suppress(FileNotFoundError):
                (self.path / "memory.swap.max").write_text("0\n")

    def stat(self) -> dict[str, int]:
        """``memory.stat``, with ``total_`` (hierarchical) keys on v1."""
        return parse_flat_keyed((self.path / "memory.stat").read_text())

    def usage(self) -> int:
        """What the cgroup is charged in all (v1: a fuzzy figure, see the module doc)."""
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        """Processes the OOM killer killed in this cgroup."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        return parse_flat_keyed((self.path / name).read_text()).get("oom_kill", 0)

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left in the cgroup (only processes we put there) and remove it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pids = self.procs()
            except FileNotFoundError:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise OSError(
                        e.errno, f"cannot remove cgroup {self.path}: {e.strerror}"
                    ) from None
            time.sleep(0.05)

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextlib.contextmanager
def fresh(name: str, *, limit: int | None = None) -> Iterator[Cgroup]:
    """A fresh memory cgroup for the ``with`` block, removed afterwards, pass or fail."""
    group = Cgroup.create(name, limit=limit)
    try:
        yield group
    finally:
        group.remove()
