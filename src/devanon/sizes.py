"""Human sizes for the command line: ``4096``, ``0x1000``, ``4K``, ``2M``, ``1G``, ``1GiB``.

Decimal unless ``0x``: ``010`` is ten (as ``dd`` and ``truncate`` read it). A ``b`` after the
digits of a hex number is a digit (``0x1b`` is 27), elsewhere it means bytes (``3kb``)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(0x[0-9a-f]+|\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from a size string; binary units (K = 1024). ValueError naming the text."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (try 4096, 0x1000, 4K, 2M, 1G)")
    number, unit = match.groups()
    value = int(number, 16) if number[:2].lower() == "0x" else int(number, 10)  # 010 is ten
    return value * _UNITS[unit.upper()]


def format_size(n: int) -> str:
    """``n`` bytes as a short binary size: ``4.0 KiB``, ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
