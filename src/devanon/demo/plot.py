"""``devanon demo --plot FILE.png``: host memory against guests, both modes, the RFC beside."""

from __future__ import annotations

import os
from typing import Any

MIB = 1 << 20


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw the demo's figures into a PNG (matplotlib, without a display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib: pip install 'devanon[plot]' (scripts/setup installs it)"
        ) from None
    modes = result["modes"]
    rfc = result["rfc"]
    colors = {"copy": "tab:red", "mmap": "tab:blue"}
    fig, (left, middle, right) = plt.subplots(
        1, 3, figsize=(14, 4.6), gridspec_kw={"width_ratios": [2.2, 1, 1]}
    )
    for name, m in modes.items():
        xs = [p["guests"] for p in m["curve"]]
        left.plot(
            xs,
            [p["total_bytes"] / MIB for p in m["curve"]],
            "o-",
            color=colors.get(name),
            label=f"{name}: total",
        )
        left.plot(
            xs,
            [p["file_bytes"] / MIB for p in m["curve"]],
            ":",
            color=colors.get(name),
            label=f"{name}: image page cache",
        )
    left.set_xlabel("guests booted")
    left.set_ylabel("host memory (MiB, memory.stat)")
    left.set_title("Host memory against guests")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    names = list(modes)
    ours = [modes[n]["per_guest_bytes"] / MIB for n in names]
    theirs = [rfc[f"{n}_bytes_per_guest"] / 1e6 for n in names]
    _bars(middle, names, ours, theirs, colors, "per guest (MiB; RFC: MB)")
    middle.set_title(f"Per guest, {modes[names[0]]['guests']} guests")

    if all(modes[n]["density"] is not None for n in names):
        dens = [float(modes[n]["density"]) for n in names]
        _bars(right, names, dens, [rfc[f"density_{n}"] for n in names], colors, "guests")
        budget = result["budget_bytes"] / MIB
        right.set_title(f"Guests that fit ({budget:.0f} MiB budget)")
    else:
        right.axis("off")
    fig.suptitle(
        f"devanon demo: {result['workload']['reads']} recorded reads, "
        f"{result['workload']['distinct_bytes'] / MIB:.1f} MiB distinct; RFC 2004 beside"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(
    ax: Any,
    names: list[str],
    ours: list[float],
    theirs: list[float],
    colors: dict[str, str],
    ylabel: str,
) -> None:
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], ours, 0.4, color=[colors.get(n) for n in names], label="ours")
    rfc_x = [x + 0.2 for x in xs]
    ax.bar(rfc_x, theirs, 0.4, color="lightgray", label="RFC 2004 (its own host)")
    for x, v in zip(xs, ours, strict=True):
        ax.text(x - 0.2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    for rx, v in zip(rfc_x, theirs, strict=True):
        ax.text(rx, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max([*ours, *theirs]) * 1.3)
    ax.legend(fontsize=8, loc="upper left")
