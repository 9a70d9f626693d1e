"""The ``demo`` and ``trace`` subcommands of ``devanon`` (argument parsing only)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from devanon.sizes import format_size, parse_size
from devanon.ubd import Mode


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_demo_command(commands: Any) -> None:
    """``devanon demo``: guests on one image in copy and mmap mode, measured by the kernel."""
    demo = commands.add_parser(
        "demo",
        help="boot guests on one image in copy and mmap mode; host memory and density",
        description=(
            "Replay a recorded boot on N UML-like guests in copy mode (two copies of disk "
            "data) and mmap mode (ubd-mmap: one), each run in a fresh memory cgroup from cold "
            "caches; report host memory as the kernel charges it and how many guests fit "
            "under a budget. Default workload: real programs starting up, replayed on this "
            "Python's standard library (see the README)."
        ),
    )
    demo.add_argument("--guests", type=int, default=8, help="guests per mode (8)")
    demo.add_argument("--mode", choices=("copy", "mmap", "both"), default="both")
    demo.add_argument("--rootfs", help="root directory the trace was recorded against")
    demo.add_argument("--trace", help="trace file (devanon trace record)")
    demo.add_argument("--memory", type=_size, default=256 << 20, help="guest RAM (256M)")
    demo.add_argument("--budget", type=_size, default=1 << 30, help="host budget (1G)")
    demo.add_argument("--no-density", action="store_true", help="skip the density runs")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--plot", metavar="FILE.png", help="draw the figures (matplotlib)")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from devanon.demo import DemoError, DemoOptions, run
    from devanon.guest.fleet import LauncherError

    modes = (Mode.COPY, Mode.MMAP) if args.mode == "both" else (Mode.parse(args.mode),)
    options = DemoOptions(
        guests=args.guests,
        modes=modes,
        rootfs=args.rootfs,
        trace=args.trace,
        memory=args.memory,
        budget=args.budget,
        density=not args.no_density,
        json=args.json,
        plot=args.plot,
    )
    try:  # SIGTERM unwinds as Ctrl-C (devanon.cli): launcher, cgroups, scratch go
        run(options)
    except (DemoError, LauncherError) as e:
        print(f"devanon demo: {e}", file=sys.stderr)
        return 1
    return 0


def add_trace_command(commands: Any) -> None:
    """``devanon trace record`` and ``devanon trace stats``."""
    trace = commands.add_parser("trace", help="record or inspect a trace of file reads")
    sub = trace.add_subparsers(dest="trace_command", required=True)
    rec = sub.add_parser(
        "record",
        help="record the file reads of a command (strace)",
        description="Run CMD under strace and write the reads it made of files under ROOT "
        "as a trace (path<TAB>offset<TAB>length, paths relative to ROOT).",
    )
    rec.add_argument("-o", "--output", required=True, help="trace file to write")
    rec.add_argument("--root", default=".", help="root directory paths are relative to (.)")
    rec.add_argument(
        "--other-bytes", type=_size, help="guest_other_bytes (default: the peak RSS measured)"
    )
    rec.add_argument("--no-mmaps", action="store_true", help="do not count mmaps of files")
    rec.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    rec.set_defaults(run=_record)
    stats = sub.add_parser("stats", help="what a trace reads (and, with --rootfs, skips)")
    stats.add_argument("file", help="trace file")
    stats.add_argument("--rootfs", help="check the lines against this root")
    stats.set_defaults(run=_stats)


def _record(args: argparse.Namespace) -> int:
    from devanon.record import record

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    rec = record(cmd, args.root, args.output, other_bytes=args.other_bytes, mmaps=not args.no_mmaps)
    print(
        f"{args.output}: {len(rec.reads)} reads of {len({p for p, _, _ in rec.reads})} files "
        f"under {args.root}, {rec.outside_root} outside it; "
        f"peak RSS {format_size(rec.max_rss_bytes)}; the command exited {rec.exit_code}"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from devanon.anon import PAGE_SIZE
    from devanon.trace import load_trace

    tr = load_trace(args.file)
    print(
        f"{args.file}: {len(tr.reads)} reads, {len({r.path for r in tr.reads})} files, "
        f"{format_size(tr.total_bytes())} read, {format_size(tr.distinct_bytes(PAGE_SIZE))} "
        f"distinct, guest_other_bytes {format_size(tr.guest_other_bytes)}"
    )
    if args.rootfs:
        from devanon.guest.plan import Plan
        from devanon.image import scan_root

        plan = Plan.compile(tr, scan_root(args.rootfs))
        print(f"against {args.rootfs}: {plan.reads} reads replay, {len(plan.problems)} skipped")
        for p in plan.problems[:20]:
            print(f"  {p}")
    return 0
