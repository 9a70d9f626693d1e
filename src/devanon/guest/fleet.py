"""Guests on one image, each its own process, started one at a time (the launcher's client).

``Fleet`` starts ``python -m devanon.guest.launcher``, hands it the config, and then asks it
for guests: ``start()`` returns when the new guest has booted (``GuestReport``) or died.
Guests that die meanwhile (the OOM killer's victims) are noted in ``died``.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from devanon.ubd import Mode

DEFAULT_TIMEOUT = 300.0


class LauncherError(RuntimeError):
    """The launcher (or a guest) failed; the message carries its words."""


@dataclass(slots=True, frozen=True)
class FleetConfig:
    """What every guest of a fleet boots."""

    image: str
    plan: str
    """A saved ``Plan`` (``Plan.save``)."""
    mode: Mode
    memory: int
    workdir: str
    other_bytes: int | None = None
    """Overrides the trace's ``guest_other_bytes``."""
    cgroup_procs: str | None = None
    prefetch: bool = True

    def to_json(self) -> str:
        return json.dumps(
            {
                "image": self.image,
                "plan": self.plan,
                "mode": self.mode.value,
                "memory": self.memory,
                "workdir": self.workdir,
                "other_bytes": self.other_bytes,
                "cgroup_procs": self.cgroup_procs,
                "prefetch": self.prefetch,
            }
        )


@dataclass(slots=True)
class GuestReport:
    """A guest's own account of its boot (the kernel's account is the measurement's)."""

    index: int
    pid: int
    booted: bool
    seconds: float = 0.0
    replay: dict[str, int] = field(default_factory=dict)
    anon_resident_bytes: int = 0
    read_calls: int = 0
    overlay_calls: int = 0
    vmas: int = 0
    signal: int = 0

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> GuestReport:
        return cls(
            index=event["guest"],
            pid=event["pid"],
            booted=event["event"] == "booted",
            seconds=event.get("seconds", 0.0),
            replay=event.get("replay", {}),
            anon_resident_bytes=event.get("anon_resident_bytes", 0),
            read_calls=event.get("read_calls", 0),
            overlay_calls=event.get("overlay_calls", 0),
            vmas=event.get("vmas", 0),
            signal=event.get("signal", 0),
        )


class Fleet:
    """A launcher and the guests it forked; ``close()`` (or ``with``) stops them all."""

    def __init__(self, config: FleetConfig, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.config = config
        self.timeout = timeout
        self.booted: list[GuestReport] = []
        self.died: list[GuestReport] = []
        self.started = 0
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "devanon.guest.launcher"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        self._buf = b""
        self._send(config.to_json())
        ready = self._next()
        if ready["event"] != "ready":
            self.close()
            raise LauncherError(ready.get("message", f"launcher said {ready}"))
        self.ready = ready

    def start(self) -> GuestReport:
        """Start one more guest; returns its report when it booted or died."""
        index = self.started
        self.started += 1
        self._send('{"cmd": "start"}')
        while True:
            event = self._next()
            kind = event["event"]
            if kind == "error":
                raise LauncherError(f"guest {event.get('guest')} failed:\n{event['message']}")
            report = GuestReport.from_event(event)
            if kind == "booted":
                self.booted.append(report)
            elif kind == "died":
                report.booted = bool(event.get("booted"))
                self.died.append(report)
                self.booted = [g for g in self.booted if g.index != report.index]
            if report.index == index and kind in ("booted", "died"):
                return report

    def alive(self) -> list[int]:
        """Indices of the guests alive now (the launcher reaps the dead first)."""
        self._send('{"cmd": "status"}')
        while True:
            event = self._next()
            if event["event"] == "status":
                return list(event["alive"])
            if event["event"] == "died":
                self.died.append(GuestReport.from_event(event))

    def close(self) -> None:
        """Stop every guest and the launcher."""
        if self._proc.poll() is None:
            try:
                self._send('{"cmd": "stop"}')
                self._proc.wait(timeout=self.timeout)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    def _next(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                raise LauncherError(f"no word from the launcher in {self.timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise LauncherError(f"the launcher exited ({self._proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        return event
