"""The daemon's figures in Prometheus format (prometheus-client): a port or a textfile."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from devanon.broker.server import Daemon

log = logging.getLogger("devanon.broker")

_GAUGES = {
    "size": ("devanon_object_size_bytes", "Size of the object"),
    "mapped_bytes": ("devanon_object_mapped_bytes", "Bytes mapped by at least one client"),
    "resident_bytes": ("devanon_object_resident_bytes", "Bytes the kernel holds (st_blocks)"),
    "clients": ("devanon_object_clients", "Clients holding counts of the object"),
    "count_runs": ("devanon_object_count_runs", "Runs the map counts take"),
}
_COUNTERS = {
    "freed_bytes": ("devanon_object_freed_bytes", "Bytes punched since creation"),
    "punch_calls": ("devanon_object_punch_calls", "fallocate calls made"),
}

_LABELS = ["name", "inode"]
"""An object's series: its name, and its memfd's inode, since an object unlinked while in
use and a new one of the same name live side by side (one name would repeat a series,
and a scraper refuses the whole page then)."""


def _label_values(obj: dict[str, object]) -> list[str]:
    return [str(obj["name"]), str(obj["inode"])]


class DaemonCollector(Collector):
    """Reads the daemon's objects at each scrape."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        objects = self.daemon.snapshot()
        families: list[GaugeMetricFamily | CounterMetricFamily] = []
        for key, (metric, help_text) in _GAUGES.items():
            family = GaugeMetricFamily(metric, help_text, labels=_LABELS)
            for obj in objects:
                family.add_metric(_label_values(obj), float(obj[key]))  # type: ignore[arg-type]
            families.append(family)
        for key, (metric, help_text) in _COUNTERS.items():
            counter = CounterMetricFamily(metric, help_text, labels=_LABELS)
            for obj in objects:
                counter.add_metric(_label_values(obj), float(obj[key]))  # type: ignore[arg-type]
            families.append(counter)
        yield from families
        yield GaugeMetricFamily(
            "devanon_daemon_crowded",
            "1 while other processes could use every CPU: the daemon naps rather than polls",
            value=float(self.daemon.crowded),
        )
        yield CounterMetricFamily(
            "devanon_daemon_naps",
            "Naps of 1 ms between looks at the rings, taken while the CPUs were crowded",
            value=float(self.daemon.naps),
        )


def export(
    daemon: Daemon,
    *,
    port: int | None = None,
    textfile: str | None = None,
    interval: float = 5.0,
) -> Callable[[], None]:
    """Serve metrics on 127.0.0.1:``port`` and/or rewrite ``textfile`` every ``interval``
    seconds; returns what stops the textfile writer and removes the file (a daemon that
    stopped cleanly leaves no figures behind that look live)."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    if port is not None:
        try:
            start_http_server(port, addr="127.0.0.1", registry=registry)
        except OSError as e:
            raise OSError(e.errno, f"--metrics-port {port}: {e.strerror}") from None
    if textfile is None:
        return lambda: None
    umask = os.umask(0o022)  # read once, here, before any thread of ours: a new textfile's
    os.umask(umask)  # mode is what the umask makes of 0666, as for any file
    new_mode = 0o666 & ~umask
    try:  # once now: a file that cannot be written is an error at start, not later
        _write_textfile(textfile, registry, new_mode)
    except OSError as e:
        raise OSError(e.errno, f"--metrics-textfile {textfile}: {e.strerror}") from None
    stop = threading.Event()

    def write() -> None:
        while not stop.wait(interval):
            try:
                _write_textfile(textfile, registry, new_mode)
            except OSError as e:  # a full disk, say: said, and tried again
                log.warning("metrics textfile %s: %s", textfile, e)

    writer = threading.Thread(target=write, name="devanon-metrics", daemon=True)
    writer.start()

    def close() -> None:
        stop.set()
        writer.join(5)  # not in the middle of a write, whose rename would bring it back
        # (a write stuck on its file system for longer: the file is left to it)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(textfile)

    return close


def _write_textfile(path: str, registry: CollectorRegistry, new_mode: int) -> None:
    """Replace ``path`` with the figures, atomically, keeping the mode and group the file
    has (an operator's ``chmod 600`` held 5 s: prometheus-client's writer makes each new
    file with the umask's mode). A new file gets ``new_mode``."""
    try:
        st = os.stat(path)
        mode, gid = stat.S_IMODE(st.st_mode), st.st_gid
    except FileNotFoundError:
        mode, gid = new_mode, -1
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(generate_latest(registry))
        if gid >= 0:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
