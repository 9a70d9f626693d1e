"""``devanon serve`` and ``devanon stat``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from devanon.broker.client import connect
from devanon.broker.daemon_log import logging_off_the_loop
from devanon.broker.server import Daemon, default_socket_path
from devanon.sizes import format_size


def add_commands(commands: Any) -> None:
    """Add the broker's subcommands to the ``devanon`` parser."""
    serve = commands.add_parser("serve", help="run the daemon that shares named objects")
    serve.add_argument(
        "--socket", help=f"socket path (default now: {default_socket_path(make_private=False)})"
    )
    serve.add_argument(
        "--socket-mode",
        type=_octal_mode,
        default=0o600,
        help="socket permissions, octal (0600: the owner alone)",
    )
    serve.add_argument("--socket-group", help="group to own the socket")
    serve.add_argument(
        "--spin-us",
        type=float,
        default=200.0,
        help="poll without sleeping this long after a request (0: always sleep); less "
        "while other processes could use every CPU",
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        help="serve Prometheus metrics on 127.0.0.1: every object's name and figures, to "
        "any local user (a textfile's mode can keep them to some)",
    )
    serve.add_argument("--metrics-textfile", help="write Prometheus metrics to this file")
    serve.set_defaults(run=_serve)

    stat = commands.add_parser("stat", help="show the daemon's objects")
    stat.add_argument("name", nargs="?", help="one object (default: all you may see)")
    stat.add_argument("--socket", help="socket path")
    stat.add_argument("--json", action="store_true", help="print JSON")
    stat.add_argument(
        "--verify", action="store_true", help="check the counts against the clients' /proc/PID/maps"
    )
    stat.set_defaults(run=_stat)


def _serve(args: argparse.Namespace) -> int:
    with logging_off_the_loop(sys.stderr.fileno(), "devanon serve: ") as last_line:
        code = _run_daemon(args)
        last_line("stopped")
    return code


def _run_daemon(args: argparse.Namespace) -> int:
    path = args.socket or default_socket_path()
    if not 0 <= args.spin_us < float("inf"):
        raise ValueError(f"--spin-us must be a number of microseconds >= 0, not {args.spin_us}")
    daemon = Daemon(
        path,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        spin=args.spin_us * 1e-6,
    )
    daemon.install_signal_handlers()
    stop_metrics: Callable[[], None] | None = None
    if args.metrics_port is not None or args.metrics_textfile is not None:
        from devanon.broker.metrics import export

        try:
            stop_metrics = export(daemon, port=args.metrics_port, textfile=args.metrics_textfile)
        except BaseException:
            daemon.close()  # its socket goes: no stale one left for the next start
            raise
    try:
        print(f"devanon serve: listening on {path} (mode {args.socket_mode:04o})", flush=True)
        daemon.serve_forever()
    finally:
        if stop_metrics is not None:
            stop_metrics()  # the textfile goes with the socket
    return 0


def _shown(name: str) -> Text:
    """An object's name for the terminal: anyone may name an object, so no rich markup is
    read in it and no control character (an escape sequence) reaches the terminal."""
    return Text("".join(c if c.isprintable() else repr(c)[1:-1] for c in name))


def _stat(args: argparse.Namespace) -> int:
    with connect(args.socket) as client:
        objects = client.stat(args.name)
        if args.verify:
            for obj in objects:
                obj["differences"] = client.verify(obj["name"])
    if args.json:
        print(json.dumps(objects, indent=2))
    else:
        table = Table(title=f"devanon objects ({len(objects)})")
        for column in ("name", "size", "mapped", "resident", "freed", "clients", "mode"):
            table.add_column(column)
        if args.verify:
            table.add_column("verify")
        for obj in objects:
            row: list[str | Text] = [
                _shown(obj["name"]),
                *(
                    format_size(obj[k])
                    for k in ("size", "mapped_bytes", "resident_bytes", "freed_bytes")
                ),
            ]
            clients = [f"{c['pid']}: {format_size(c['mapped_bytes'])}" for c in obj["clients"]]
            if obj.get("clients_omitted"):
                clients.append(f"{obj['clients_omitted']} more")
            row += [", ".join(clients) or "-", obj["mode"]]
            if args.verify:
                row.append(
                    "ok" if not obj["differences"] else f"{len(obj['differences'])} differences"
                )
            table.add_row(*row)
        Console().print(table)
    bad = [obj for obj in objects if obj.get("differences")]
    if bad:
        print(
            f"devanon stat: counts differ from the kernel's for {len(bad)} object(s)",
            file=sys.stderr,
        )
    return 1 if bad else 0


def _octal_mode(text: str) -> int:
    """``--socket-mode``: octal permission bits, 0 to 0777."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a mode between 0 and 0777")
    return mode


def _port(text: str) -> int:
    """``--metrics-port``: a TCP port, 0 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port between 0 and 65535")
    return port
