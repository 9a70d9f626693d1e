"""How the polling daemon gives its CPU away between requests, as strace counts its calls.

The daemon polls its clients' rings rather than sleep between requests (a wake-up costs
more than a request here). A pass that finds nothing lets a waiting process have the CPU:
with a CPU idle, by ``sched_yield``; with every CPU wanted, by a doze (a wait of at most
30 us for a message: ``select``, which Python makes as ``pselect6``), because a yield
cannot hand the CPU to another scheduling group (``devanon.broker.crowding``,
``Daemon._give_way``). A message that comes meanwhile ends the doze.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from broker_daemon import busy_cpus, start_daemon, wait_for

from devanon.broker import connect
from devanon.broker.crowding import CrowdWatch

PS = os.sysconf("SC_PAGE_SIZE")
GIVING_WAY = ("sched_yield", "pselect6", "select")
PAIRS = 2000

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="needs strace (scripts/setup installs it)"
)


def counted(table: str) -> dict[str, int]:
    """The calls column of ``strace -c``'s table, by syscall."""
    calls = dict.fromkeys(GIVING_WAY, 0)
    for line in table.splitlines():
        fields = line.split()
        if fields and fields[-1] in calls:
            calls[fields[-1]] = int(fields[3])
    return calls


@pytest.mark.parametrize("crowded", [False, True], ids=["idle-cpus", "crowded-cpus"])
def test_a_polling_daemon_dozes_between_requests_while_every_cpu_is_wanted_else_yields(
    tmp_path: Path, crowded: bool
) -> None:
    cpus = len(os.sched_getaffinity(0))
    daemon = start_daemon(str(tmp_path / "dv.sock"))
    out = tmp_path / "strace.txt"
    try:
        with busy_cpus(cpus + 1 if crowded else 0), connect(daemon.socket) as client:
            if crowded:  # the premise, from the kernel's run queue
                assert wait_for(lambda: CrowdWatch().crowded(time.monotonic()))
            obj = client.open("doze", PS, create=True)
            trace = ["strace", "-f", "-c", "-e", f"trace={','.join(GIVING_WAY)}", "-o", str(out)]
            tracer = subprocess.Popen(
                [*trace, "-p", str(daemon.process.pid)],
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                time.sleep(1.0)  # attached to every thread (it says so on stderr)
                for _ in range(PAIRS):  # requests close enough together to keep it polling
                    obj.map(0, PS).close()
            finally:
                tracer.send_signal(signal.SIGINT)  # detaches, then writes the table
                _, attached = tracer.communicate(timeout=30)
            assert "attached" in attached, attached
            obj.close()
    finally:
        assert daemon.stop() == 0
    calls = counted(out.read_text())
    if crowded:
        assert calls["pselect6"] + calls["select"] > 0, calls
    else:
        # (The idle CPUs' premise can fail for a moment, the strace itself being runnable:
        # a doze may show, but the yields must.)
        assert calls["sched_yield"] > 0, calls
