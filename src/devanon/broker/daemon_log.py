"""The daemon's log, written by a thread of its own.

A daemon that wrote its log itself would stop serving every client while nobody read the
log (a full pipe blocks the write). So the loop only queues each record
(``logging.handlers.QueueHandler``) and a ``QueueListener`` thread writes them. Records
past ``BACKLOG`` are dropped and counted, and at the end the thread gets a few seconds to
write what is queued: a log nobody reads cannot keep the daemon from stopping either.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
from collections.abc import Iterator
from typing import TextIO

BACKLOG = 10_000
"""Records kept while the log is not read, before the daemon drops them."""
FLUSH_TIMEOUT = 5.0
"""Seconds the writer gets at the end to write what is queued."""


class _DroppingHandler(logging.handlers.QueueHandler):
    """Queues records for the writer; drops (and counts) those past ``BACKLOG``."""

    def __init__(self, backlog: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(backlog)
        self.backlog = backlog
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.backlog.qsize() >= BACKLOG:  # one slot stays free for the writer's sentinel
            self.dropped += 1
        else:
            self.backlog.put_nowait(record)


class _Writer(logging.handlers.QueueListener):
    def stop_within(self, timeout: float) -> None:
        """Write what is queued, for at most ``timeout`` seconds (``stop`` would wait for
        ever on a log nobody reads; the thread is a daemon thread)."""
        self.enqueue_sentinel()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


@contextlib.contextmanager
def logging_off_the_loop(stream: TextIO, prefix: str) -> Iterator[None]:
    """Send the ``logging`` records of the code inside to ``stream`` through a thread,
    each line starting with ``prefix``; say at the end how many were dropped."""
    backlog: queue.Queue[logging.LogRecord] = queue.Queue(BACKLOG + 1)
    handler = _DroppingHandler(backlog)
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    writer = _Writer(backlog, logging.StreamHandler(stream))
    writer.start()
    try:
        yield
    finally:
        writer.stop_within(FLUSH_TIMEOUT)
        if handler.dropped:
            print(f"{prefix}{handler.dropped} log lines dropped: the log was not read", flush=True)
