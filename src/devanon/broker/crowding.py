"""Whether the daemon's polling would take a CPU that other processes are waiting for.

Between requests the daemon polls the rings for ``spin`` seconds rather than sleep, because
a sleeping process takes ~100 us to wake on a virtual machine. That is free while a CPU is
idle. It is not when every CPU is wanted: a daemon started from another terminal or by a
service manager is a scheduling group of its own (the kernel's autogroup, or a service's
cgroup), the scheduler gives that group its share of the machine whenever it is runnable,
and ``sched_yield`` only lets the daemon's own group run. Measured on 2 CPUs, 8 clients
each computing ~150 us between a map and an unmap: the polling daemon held 0.87 of a CPU,
and the clients made 3,900-4,300 iterations a second, against 6,400-6,900 with the daemon
in their own group; napping as below, 5,000-5,700 (``benchmarks/broker.py``, row
``8_clients_computing``).

So the daemon looks at how many tasks the kernel has runnable (``/proc/loadavg``, the
``running/total`` field, for the whole machine) at most every ``CHECK_S`` seconds; when
the others alone could fill every CPU it may use, it dozes on a look that finds nothing
(up to 30 us, ended by any message: ``Daemon._give_way``), polls only briefly after a
request and naps in between (``Daemon.serve_forever``); after a while of nothing it
sleeps, and the clients ring the doorbell (``Op.WAKE``). The price is latency: a request
that comes while the daemon naps waits for the end of the nap (up to 1 ms). The run queue
is the whole machine's against the CPUs the daemon may run on (its affinity), so a daemon
pinned to one CPU, or in a container that shares the host's ``/proc/loadavg``, naps sooner
(slower, never wrong), and a CPU quota (cgroup ``cpu.max``) is not seen.
"""

from __future__ import annotations

import os

LOADAVG = "/proc/loadavg"
CHECK_S = 0.01
"""How long one look at the run queue is trusted."""


def runnable_tasks(path: str = LOADAVG) -> int | None:
    """Tasks runnable on the whole machine now, the caller included (None if unknown)."""
    try:
        with open(path, "rb") as f:
            field = f.read().split()[3]
        return int(field.split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return None


class CrowdWatch:
    """``crowded(now)``: whether other runnable tasks could use every CPU we may run on."""

    __slots__ = ("_checked", "_cpus", "_crowded", "path")

    def __init__(self, path: str = LOADAVG, cpus: int | None = None) -> None:
        self.path = path
        self._cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
        self._checked = float("-inf")
        self._crowded = False

    @property
    def last(self) -> bool:
        """What the last look said (False before any)."""
        return self._crowded

    def crowded(self, now: float) -> bool:
        """Looked up at most every ``CHECK_S`` seconds of ``now`` (``time.monotonic``)."""
        if now - self._checked >= CHECK_S:
            self._checked = now
            running = runnable_tasks(self.path)
            self._crowded = running is not None and running - 1 >= self._cpus
        return self._crowded
