"""Shared fixtures. Each area keeps its own helpers in its test files; only cross-area ones live here."""

from __future__ import annotations

import os
import sys

import pytest

# The package under test is the checkout, also when pytest is started from elsewhere.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def id_dataset_factory(tmp_path_factory):
    """Build (once per session and arguments) a dataset whose sample i has column id == i."""
    from streamshard.testing import write_id_dataset

    made: dict[tuple, str] = {}

    def make(num_samples: int, **kwargs) -> str:
        key = (num_samples, tuple(sorted(kwargs.items())))
        if key not in made:
            path = tmp_path_factory.mktemp("ids") / f"ds-{num_samples}"
            made[key] = write_id_dataset(str(path), num_samples, **kwargs)
        return made[key]

    return make


def pytest_collection_modifyitems(config, items):
    """Every ``slow`` mark says why (``@pytest.mark.slow(reason=...)``): a test over 5 s on the
    development machine is marked, and the mark is its justification. Long fuzz budgets run
    only when asked (``pytest -m fuzz``): each is the longer duplicate of a short fuzz test that
    always runs, so the default run deselects nothing that matters."""
    bare = [item.nodeid for item in items
            for mark in item.iter_markers("slow") if not mark.kwargs.get("reason")]
    if bare:
        raise pytest.UsageError("slow marks without reason=...: " + ", ".join(bare[:5]))
    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    keep = [it for it in items if it.get_closest_marker("fuzz") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[it for it in items if it not in keep])
        items[:] = keep
