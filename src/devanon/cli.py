"""The ``devanon`` command: ``demo``, ``trace``, ``tour``, ``punch``, ``serve``, ``stat``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from devanon import tour
from devanon.broker.commands import add_commands as add_broker_commands
from devanon.demo.commands import add_demo_command, add_trace_command
from devanon.punch import punch_hole
from devanon.sizes import format_size, parse_size


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``devanon`` console script."""
    parser = argparse.ArgumentParser(
        prog="devanon", description="/dev/anon in userspace: map-counted, self-freeing memory."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    add_demo_command(commands)
    add_trace_command(commands)

    tour_ = commands.add_parser("tour", help="walk through the device, measured by the kernel")
    tour_.add_argument("--size", type=_size, default=256 << 20, help="Anon size (256M)")
    tour_.add_argument("--json", action="store_true", help="print the steps as JSON")
    tour_.set_defaults(run=_tour)

    punch = commands.add_parser("punch", help="free a range of any file (sys_punch)")
    punch.add_argument("file", help="the file to punch a hole in")
    punch.add_argument("offset", type=_size, help="where the hole starts (e.g. 4K)")
    punch.add_argument("length", type=_size, help="how long it is (e.g. 2M)")
    punch.set_defaults(run=_punch)

    add_broker_commands(commands)

    args = parser.parse_args(argv)
    # SIGTERM (a timeout, a service manager) unwinds as Ctrl-C does, through every
    # ``finally``: temporary files, cgroups, child processes go (``serve`` has its own).
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        status: int = args.run(args)
    except (OSError, ValueError) as e:
        print(f"devanon {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"devanon {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
    return status


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tour(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([asdict(s) for s in tour.run(args.size)], indent=2))
        return 0
    console = Console()
    table = Table(title="devanon: the device, as the kernel sees it")
    for column in ("step", "resident (st_blocks)", "data (SEEK_DATA)", "count of page 0"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for step in tour.run(args.size):
        table.add_row(
            step.action,
            format_size(step.resident_bytes),
            format_size(step.data_bytes),
            str(step.map_count),
        )
    console.print(table)
    return 0


def _punch(args: argparse.Namespace) -> int:
    result = punch_hole(args.file, args.offset, args.length)
    print(
        f"{result.file}: punched [{result.offset}, {result.offset + result.length}): "
        f"st_blocks {result.blocks_before} -> {result.blocks_after}, "
        f"{format_size(result.freed_bytes)} freed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
