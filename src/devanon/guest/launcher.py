"""The launcher: one lean process that forks guests, each a process of its own.

Run as ``python -m devanon.guest.launcher`` by ``devanon.guest.fleet``. It reads a JSON
config line on stdin and loads the plan (compiled and saved by the caller: this process
parses no JSON manifest, so its heap stays small and unfragmented). It then boots a few
small throw-away guests: CPython 3.11 rewrites a function's bytecode as it warms up
(quickening), and a guest forked before that would copy every page of bytecode it runs.
Then it freezes its heap (``gc.freeze``: the collector leaves it alone in the guests) and
says ``ready``. A guest's own memory is the measurement: what it copies of the launcher's
pages counts against it.
Each ``start`` command forks a guest that joins the measurement's cgroup first (so all it
allocates is charged there, and the launcher is not), boots (other memory, then the
replay), reports, and then idles until the launcher closes its control pipe.

Events go to stdout as JSON lines: ``ready``, ``booted``, ``died`` (with the signal: 9 is
what the OOM killer sends), ``error``, ``status``.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

from devanon.guest.machine import Guest
from devanon.guest.plan import Plan


@dataclass(slots=True)
class _Child:
    index: int
    pid: int
    report: int
    control: int
    booted: bool = False
    alive: bool = True


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _guest_main(index: int, config: dict[str, Any], plan: Plan) -> tuple[dict[str, Any], Guest]:
    """Runs in the forked guest: join the cgroup, boot, and say what it cost.

    The guest is returned so that it lives (and holds its memory) until the process ends.
    """
    procs = config.get("cgroup_procs")
    if procs:
        with open(procs, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
    other = config.get("other_bytes")
    other = plan.guest_other_bytes if other is None else int(other)
    cow = os.path.join(config["workdir"], f"guest{index}.cow") if config.get("workdir") else None
    start = time.perf_counter()
    guest = Guest.create(
        config["image"],
        config["mode"],
        int(config["memory"]),
        cow=cow,
        prefetch=bool(config.get("prefetch", True)),
        name=f"devanon-guest{index}",
    )
    guest.add_other_memory(other)
    result = guest.replay(plan)
    seconds = time.perf_counter() - start
    event = {
        "event": "booted",
        "guest": index,
        "pid": os.getpid(),
        "seconds": seconds,
        "replay": result.as_dict(),
        "other_bytes": other,
        "anon_resident_bytes": guest.memory.resident_bytes(),
        "read_calls": guest.device.stats.read_calls,
        "overlay_calls": guest.memory.overlay_calls,
        "vmas": guest.memory.vmas(),
        "cached_pages": len(guest.cache),
    }
    return event, guest


def _warm_up(config: dict[str, Any], page_size: int, rounds: int = 10) -> None:
    """Boot small guests on a scratch image of their own, so the code guests run is warm.

    Never on the real image: its page cache must be charged to the measurement's cgroup,
    and be cold when the measurement starts.
    """
    pages = 64
    plan = Plan(page_size, ["scratch"], {})
    for i in range(16):
        plan.read_line.append(i + 1)
        plan.read_file.append(0)
        plan.read_offset.append(i * 4 * page_size + 100)
        plan.read_length.append(2 * page_size)
        plan.piece_page.append(i * 4)
        plan.piece_block.append(i * 4)
        plan.piece_count.append(3)
        plan.read_piece.append(len(plan.piece_page))
    with tempfile.NamedTemporaryFile(prefix="devanon-warm-up-", dir=config.get("workdir")) as f:
        f.truncate(pages * page_size)
        f.flush()
        for _ in range(rounds):
            with Guest.create(f.name, config["mode"], 4 << 20, name="devanon-warm-up") as g:
                g.add_other_memory(64 << 10)
                g.replay(plan)
                g.memory.vmas()
                g.memory.resident_bytes()
                g.drop_caches()


def _fork_guest(index: int, config: dict[str, Any], plan: Plan, children: list[_Child]) -> _Child:
    report_r, report_w = os.pipe()
    control_r, control_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the guest
        status = 0
        _guest: Guest | None = None
        try:
            gc.disable()
            os.close(report_r)
            os.close(control_w)
            for c in children:
                os.close(c.report)
                os.close(c.control)
            event, _guest = _guest_main(index, config, plan)
        except BaseException:
            event = {"event": "error", "guest": index, "message": traceback.format_exc()}
            status = 1
        try:
            os.write(report_w, (json.dumps(event) + "\n").encode())
            if status == 0:
                while os.read(control_r, 1):
                    pass
        finally:
            os._exit(status)
    os.close(report_w)
    os.close(control_r)
    return _Child(index, pid, report_r, control_w)


def _reap(child: _Child) -> dict[str, Any]:
    _, status = os.waitpid(child.pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    return {"event": "died", "guest": child.index, "pid": child.pid, "signal": sig, "exit": code}


def main() -> int:
    config = json.loads(sys.stdin.readline())
    try:
        plan = Plan.load(config["plan"])
        _warm_up(config, plan.page_size)
    except (OSError, ValueError) as e:
        _emit({"event": "error", "message": str(e)})
        return 1
    _emit(
        {
            "event": "ready",
            "reads": plan.reads,
            "lines": plan.lines,
            "distinct_bytes": plan.distinct_bytes,
            "total_bytes": plan.total_bytes,
            "guest_other_bytes": plan.guest_other_bytes,
        }
    )
    gc.collect()
    gc.freeze()
    children: list[_Child] = []
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    buffers: dict[int, bytes] = {}
    stdin_buf = b""
    running = True
    while running:
        for key, _ in sel.select():
            fd = key.fd
            data = os.read(fd, 65536)
            if key.data is None:  # a command
                if not data:
                    running = False
                    break
                stdin_buf += data
                while b"\n" in stdin_buf:
                    line, stdin_buf = stdin_buf.split(b"\n", 1)
                    cmd = json.loads(line)["cmd"]
                    if cmd == "start":
                        child = _fork_guest(len(children), config, plan, children)
                        children.append(child)
                        sel.register(child.report, selectors.EVENT_READ, child)
                    elif cmd == "status":
                        _emit({"event": "status", "alive": [c.index for c in children if c.alive]})
                    elif cmd == "stop":
                        running = False
                continue
            child = key.data
            if data:
                buffers[fd] = buffers.get(fd, b"") + data
                while b"\n" in buffers[fd]:
                    line, buffers[fd] = buffers[fd].split(b"\n", 1)
                    event = json.loads(line)
                    child.booted = child.booted or event.get("event") == "booted"
                    _emit(event)
                continue
            sel.unregister(fd)
            os.close(fd)
            buffers.pop(fd, None)
            child.alive = False
            os.close(child.control)
            _emit(_reap(child) | {"booted": child.booted})
    for child in children:  # booted guests exit when their control pipe closes
        if child.alive:
            os.close(child.control)
            if not child.booted:
                os.kill(child.pid, signal.SIGKILL)
    for child in children:
        if child.alive:
            os.waitpid(child.pid, 0)
    _emit({"event": "stopped"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
