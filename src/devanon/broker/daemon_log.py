"""The daemon's log, written by a thread of its own.

A daemon that wrote its log itself would stop serving every client while nobody read the
log (a full pipe blocks the write). So the loop only queues each record
(``logging.handlers.QueueHandler``) and a ``QueueListener`` thread writes the lines to a
descriptor. Records past ``BACKLOG`` are dropped and counted. At the end the thread gets
``FLUSH_TIMEOUT`` seconds to write what is queued, then the daemon exits all the same: a
log nobody reads cannot keep it from stopping either.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import queue
from collections.abc import Callable, Iterator

BACKLOG = 10_000
"""Records kept while the log is not read, before the daemon drops them."""
FLUSH_TIMEOUT = 5.0
"""Seconds the writer gets at the end to write what is queued."""
_LAST_WORDS = 2
"""Queue slots kept for the end: the count of dropped lines and the caller's last line
(and one more for the writer's stop)."""


class _DroppingHandler(logging.handlers.QueueHandler):
    """Queues records for the writer; drops (and counts) those past ``BACKLOG``."""

    def __init__(self, backlog: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(backlog)
        self.backlog = backlog
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.backlog.qsize() >= BACKLOG:
            self.dropped += 1
        else:
            self.backlog.put_nowait(record)


class _LineWriter(logging.Handler):
    """Writes each record's (already formatted) line to a descriptor, taking no lock:
    ``logging.shutdown`` at exit takes every handler's lock, and would wait for ever
    behind a write blocked on a log nobody reads."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def handle(self, record: logging.LogRecord) -> bool:
        data = f"{record.getMessage()}\n".encode(errors="replace")
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:  # the reader is gone (EPIPE): the line goes nowhere
            pass
        return True


class _Writer(logging.handlers.QueueListener):
    def stop_within(self, timeout: float) -> None:
        """Write what is queued, for at most ``timeout`` seconds (``stop`` would wait for
        ever on a log nobody reads; the thread is a daemon thread)."""
        self.enqueue_sentinel()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


@contextlib.contextmanager
def logging_off_the_loop(fd: int, prefix: str) -> Iterator[Callable[[str], None]]:
    """Send the ``logging`` records of the code inside to descriptor ``fd`` through a
    thread, each line starting with ``prefix``. Yields ``last_line(text)``, for the
    caller's last words, which come after every record and the count of dropped ones."""
    backlog: queue.Queue[logging.LogRecord] = queue.Queue(BACKLOG + _LAST_WORDS + 1)
    handler = _DroppingHandler(backlog)
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    writer = _Writer(backlog, _LineWriter(fd))
    writer.start()

    def say(text: str) -> None:
        backlog.put_nowait(logging.makeLogRecord({"msg": f"{prefix}{text}"}))

    def say_dropped() -> None:
        if handler.dropped:
            say(f"{handler.dropped} log lines dropped: the log was not read")
            handler.dropped = 0

    def last_line(text: str) -> None:
        say_dropped()
        say(text)

    try:
        yield last_line
    finally:
        say_dropped()
        writer.stop_within(FLUSH_TIMEOUT)
