"""The demo's results: one dict (``--json``), and the table a person reads.

Per mode: host memory with N guests as the kernel charges it (``host_bytes_total`` =
``file_bytes`` + ``shmem_bytes`` + ``anon_bytes``), ``per_guest_bytes`` (total / N),
``per_added_guest_bytes`` (what each guest after the first added), and ``density``. Then
``savings`` = 1 - mmap total / copy total, and the issue's checks, each with its figures.
"""

from __future__ import annotations

from typing import Any

from devanon.demo.runs import Curve, Density, Workload
from devanon.sizes import format_size

RFC = {
    "source": "Jeff Dike, [RFC] /dev/anon, 2004-01-13: booting a Debian image in UML",
    "copy_bytes_per_guest": 28_000_000,
    "mmap_bytes_per_guest": 21_000_000,
    "savings": 0.25,
    "density_copy": 16,
    "density_mmap": 20,
    "density_ratio": 1.25,
}


def mode_dict(curve: Curve, density: Density | None) -> dict[str, Any]:
    """The figures of one mode."""
    last = curve.samples[-1]
    n = len(curve.samples)
    first = curve.samples[0].total_bytes
    reports = curve.reports
    out: dict[str, Any] = {
        "guests": n,
        "host_bytes_total": last.total_bytes,
        "file_bytes": last.file_bytes,
        "shmem_bytes": last.shmem_bytes,
        "anon_bytes": last.anon_bytes,
        "kernel_bytes": last.kernel_bytes,
        "per_guest_bytes": last.total_bytes // n,
        "first_guest_bytes": first,
        "per_added_guest_bytes": (last.total_bytes - first) // (n - 1) if n > 1 else None,
        "density": density.guests if density else None,
        "density_measured": density.measured if density else None,
        "curve": [{"guests": k + 1, **s.as_dict()} for k, s in enumerate(curve.samples)],
        "image_cached_before_bytes": curve.cached_before,
        "guest_anon_resident_bytes": [r.anon_resident_bytes for r in reports],
        "boot_seconds": [round(r.seconds, 4) for r in reports],
        "mappings": {
            "read_calls": reports[0].read_calls,
            "overlay_calls": reports[0].overlay_calls,
            "vmas": reports[0].vmas,
        },
        "replay": reports[0].replay,
    }
    if density is not None and density.measured:
        out["density_detail"] = {
            "how": "guests started one at a time in a memory cgroup limited to the budget; "
            "a guest does not fit when the cgroup's oom_kill count rises or it dies",
            "started": density.started,
            "oom_kills": density.oom_kills,
            "survivors": density.survivors,
            "hit_cap": density.hit_cap,
            "host_at_density": density.last.as_dict() if density.last else None,
        }
    return out


def build(
    workload: Workload,
    curves: dict[str, Curve],
    densities: dict[str, Density],
    *,
    measured_by: str,
    memory: int,
    budget: int,
) -> dict[str, Any]:
    """Everything ``--json`` prints."""
    plan = workload.plan
    distinct = plan.distinct_bytes
    other = plan.guest_other_bytes
    result: dict[str, Any] = {
        "workload": {
            "default": workload.default,
            "rootfs": str(workload.rootfs),
            "trace": str(workload.trace_path),
            "image": str(workload.image),
            "image_bytes": workload.manifest.image_size,
            "what": workload.trace.meta.get("command", ""),
            "lines": plan.lines,
            "reads": plan.reads,
            "skipped": [str(p) for p in plan.problems[:20]],
            "skipped_count": len(plan.problems),
            "distinct_bytes": distinct,
            "read_bytes": plan.total_bytes,
            "guest_other_bytes": other,
            "note": workload.note,
        },
        "measured_by": measured_by,
        "guest_memory_bytes": memory,
        "budget_bytes": budget,
        "modes": {m: mode_dict(c, densities.get(m)) for m, c in curves.items()},
        "rfc": RFC,
    }
    modes = result["modes"]
    if "copy" in modes and "mmap" in modes:
        copy, mmap = modes["copy"], modes["mmap"]
        result["savings"] = 1 - mmap["host_bytes_total"] / copy["host_bytes_total"]
        one_copy, one_mmap = copy["curve"][0]["total_bytes"], mmap["curve"][0]["total_bytes"]
        result["savings_one_guest"] = 1 - one_mmap / one_copy
        checks: dict[str, Any] = {
            "one_guest_mmap_le_copy_minus_90pct_distinct": {
                "mmap_bytes": one_mmap,
                "copy_bytes": one_copy,
                "bound_bytes": int(one_copy - 0.9 * distinct),
                "ok": one_mmap <= one_copy - 0.9 * distinct,
            }
        }
        if mmap["per_added_guest_bytes"] is not None:
            bound = other + 0.1 * distinct
            checks["mmap_per_added_guest_le_other_plus_10pct_distinct"] = {
                "guests": mmap["guests"],
                "per_added_guest_bytes": mmap["per_added_guest_bytes"],
                "bound_bytes": int(bound),
                "ok": mmap["per_added_guest_bytes"] <= bound,
            }
        if copy["density"] and mmap["density"] is not None:
            ratio = mmap["density"] / copy["density"]
            result["density_ratio"] = ratio
            checks["density_ratio_ge_rfc"] = {
                "ratio": ratio,
                "rfc": RFC["density_ratio"],
                "measured": bool(copy["density_measured"] and mmap["density_measured"]),
                "ok": ratio >= RFC["density_ratio"],
            }
        result["checks"] = checks
    return result


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Column names and rows of the summary table (modes side by side, the RFC beside)."""
    modes = result["modes"]
    names = list(modes)
    cols = ["", *names, "RFC (2004)"]
    rfc = result["rfc"]

    def row(label: str, key: str, rfc_text: str = "") -> list[str]:
        cells = []
        for m in names:
            v = modes[m].get(key)
            cells.append("-" if v is None else format_size(v))
        return [label, *cells, rfc_text]

    n = modes[names[0]]["guests"]
    rows = [
        row("image page cache (file)", "file_bytes"),
        row("guest memory (shmem)", "shmem_bytes"),
        row("processes (anon)", "anon_bytes"),
        row(f"host total, {n} guest(s)", "host_bytes_total"),
        row("first guest", "first_guest_bytes"),
        row("per guest", "per_guest_bytes", "28 MB / 21 MB"),
        row("per added guest", "per_added_guest_bytes"),
        [
            "density under the budget",
            *[
                "-"
                if modes[m]["density"] is None
                else f"{modes[m]['density']}{'' if modes[m]['density_measured'] else ' (est.)'}"
                for m in names
            ],
            f"{rfc['density_copy']} / {rfc['density_mmap']}",
        ],
        [
            "mappings (calls / VMAs)",
            *[
                f"{modes[m]['mappings']['read_calls']} / {modes[m]['mappings']['vmas']}"
                for m in names
            ],
            "",
        ],
        [
            "boot, first guest",
            *[f"{modes[m]['boot_seconds'][0]:.2f} s" for m in names],
            "",
        ],
    ]
    return cols, rows


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The sentences under the table: workload, savings, checks."""
    w = result["workload"]
    lines = [
        f"workload: {w['reads']} reads of {w['rootfs']} replayed from {w['trace']} "
        f"({format_size(w['distinct_bytes'])} distinct, guest other memory "
        f"{format_size(w['guest_other_bytes'])}); the guests replay recorded reads, "
        "they run no guest code",
        f"measured by: {result['measured_by']}",
    ]
    if w["note"]:
        lines.append(f"note: {w['note']}")
    if w["skipped_count"]:
        lines.append(f"skipped {w['skipped_count']} trace line(s), e.g. {w['skipped'][0]}")
    if "savings" in result:
        lines.append(
            f"savings: {result['savings']:.1%} of host memory with "
            f"{result['modes']['mmap']['guests']} guest(s), {result['savings_one_guest']:.1%} "
            f"with one (RFC: {result['rfc']['savings']:.0%})"
        )
    if "density_ratio" in result:
        lines.append(
            f"density mmap/copy: {result['density_ratio']:.2f} "
            f"(RFC: {result['rfc']['density_ratio']})"
        )
    for name, check in result.get("checks", {}).items():
        lines.append(f"check {name}: {'ok' if check['ok'] else 'NOT MET'}")
    return lines
