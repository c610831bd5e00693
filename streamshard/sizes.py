"""Byte sizes written by people: ``"64MB"``, ``"128KiB"``, ``1 << 20``."""

from __future__ import annotations

import re

from streamshard.errors import ConfigError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Return ``value`` in bytes. ``KB/MB/GB`` are powers of 1000, ``KiB/MiB/GiB`` (and the bare
    ``K/M/G``) powers of 1024. Raises ``ConfigError`` naming ``name`` for anything else."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a size like '64MB' or an int, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
        return value
    match = _PATTERN.match(str(value))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"{name} must be a size like '64MB' or '128KiB', got {value!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return size


def format_size(n: float) -> str:
    """``1536 -> '1.5 KiB'``: for progress bars and summaries."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
