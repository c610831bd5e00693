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


# Units format_size may print, largest first. Decimal units are the default (they match how
# sizes are written on the command line: "64MB"); a binary unit is used only when it renders the
# value exactly and no decimal unit does (block sizes like 64KiB).
_DECIMAL = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_size(n: float) -> str:
    """A byte count as people write it, and as :func:`parse_size` reads it back.

    An exact multiple of a unit prints as that whole number: ``64_000_000 -> '64 MB'``,
    ``65536 -> '64 KiB'`` (decimal units preferred). Anything else prints in decimal units with
    one decimal: ``86_400 -> '86.4 KB'``. Below 1000: ``'512 B'``."""
    if isinstance(n, int) or float(n).is_integer():
        whole = int(n)
        for unit, mult in _DECIMAL + _BINARY:
            if whole and abs(whole) >= mult and whole % mult == 0 and abs(whole) // mult < 10**4:
                return f"{whole // mult} {unit}"
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for i, (unit, mult) in enumerate(_DECIMAL):
        if abs(n) >= mult:
            if round(abs(n) / mult, 1) >= 1000 and i:  # 999_999 is "1.0 MB", not "1000.0 KB"
                unit, mult = _DECIMAL[i - 1]
            return f"{n / mult:.1f} {unit}"
    raise AssertionError("unreachable: abs(n) >= 1000")
