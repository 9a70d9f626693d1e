"""Finding the memory cgroup (v1 and v2) and reading memory.stat, from text."""

from __future__ import annotations

from pathlib import Path

from devanon.cgroups import inside, parse_flat_keyed, parse_mountinfo, parse_proc_cgroup
from devanon.measure import sample_from_stat

MOUNTINFO = """\
25 20 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
30 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_mounts_v1_memory_first_then_v2() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [(m.version, m.path) for m in mounts] == [
        (1, "/sys/fs/cgroup/memory"),
        (2, "/sys/fs/cgroup/unified"),
    ]


def test_proc_cgroup() -> None:
    text = "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/x\n0::/user.slice\n"
    assert parse_proc_cgroup(text) == {1: "/process_api/abc", 2: "/user.slice"}


def test_inside_strips_a_mount_root() -> None:
    m = parse_mountinfo("40 1 0:9 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")[0]
    assert inside(m, "/docker/abc/child") == Path("/sys/fs/cgroup/child")
    assert inside(m, "/") == Path("/sys/fs/cgroup")


def test_samples_v1_and_v2() -> None:
    v1 = parse_flat_keyed("cache 5\nrss 6\ntotal_cache 300\ntotal_rss 50\ntotal_shmem 200\n")
    s = sample_from_stat(v1, 1, usage=400)
    assert (s.file_bytes, s.shmem_bytes, s.anon_bytes, s.kernel_bytes) == (100, 200, 50, 50)
    assert s.total_bytes == 350
    v2 = {"file": 300, "anon": 50, "shmem": 200, "kernel": 7}
    s = sample_from_stat(v2, 2, usage=1000)
    assert (s.file_bytes, s.shmem_bytes, s.anon_bytes, s.kernel_bytes) == (100, 200, 50, 7)
