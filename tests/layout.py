"""The installed package's modules, found from the source tree (a helper, not a test module)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Source folder -> the package name it installs as (pyproject's package-dir mapping).
SOURCES = {"streamshard": "streamshard", "converters": "streamshard.converters"}


def modules() -> dict[str, str]:
    """Every module of the installed package, by dotted name -> file path."""
    found = {}
    for folder, package in SOURCES.items():
        base = os.path.join(ROOT, folder)
        for directory, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(directory, f), base)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join([package, *rel])] = os.path.join(directory, f)
    return found
