"""docs/API.md matches the code: its top-level list is exactly ``streamshard.__all__``, every
name it imports or names by module imports, every module path it maps exists; subpackages
export sorted, importable public lists."""

from __future__ import annotations

import importlib
import os
import re

import pytest

import streamshard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "docs", "API.md")


def api_text() -> str:
    with open(API, encoding="utf-8") as f:
        return f.read()


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def top_level_names(text: str) -> list[str]:
    body = section(text, "Top-level names (`streamshard.__all__`)")
    bullets = "\n".join(line for line in body.splitlines()
                        if line.startswith("- ") or line.startswith("  "))
    return re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", bullets)


def test_api_md_lists_exactly_streamshard_all():
    listed = top_level_names(api_text())
    assert len(listed) == len(set(listed)), "a name is listed twice"
    assert sorted(listed) == streamshard.__all__
    for name in listed:
        assert getattr(streamshard, name) is not None


def test_all_is_sorted_and_dir_shows_lazy_names():
    assert sorted(streamshard.__all__) == streamshard.__all__
    assert set(streamshard.__all__) <= set(dir(streamshard))


def test_the_checker_sees_a_missing_name():
    text = api_text()
    body = section(text, "Top-level names (`streamshard.__all__`)")
    text = text.replace(body, body.replace("`sample_rng`", ""))
    assert sorted(top_level_names(text)) != streamshard.__all__


def test_every_import_in_api_md_code_works():
    imports = re.findall(r"^\s*from (streamshard[\w.]*) import ([\w, ]+)", api_text(), re.M)
    assert imports, "API.md shows no imports"
    for module, names in imports:
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",") if n.strip()):
            assert hasattr(mod, name), f"API.md: from {module} import {name}"


def test_every_module_path_in_api_md_exists():
    paths = set(re.findall(r"`(streamshard/[\w/]+\.py)`", api_text()))
    assert len(paths) > 10
    missing = [p for p in sorted(paths) if not os.path.exists(os.path.join(ROOT, p))]
    assert missing == []


@pytest.mark.parametrize("package", ["streamshard.sampler", "streamshard.remote",
                                     "streamshard.recovery", "streamshard.converters"])
def test_subpackages_export_a_sorted_importable_list(package):
    mod = importlib.import_module(package)
    assert mod.__all__ == sorted(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"
    assert set(mod.__all__) <= set(dir(mod))


def test_convert_md_lists_every_registered_format():
    import streamshard.converters as converters

    with open(os.path.join(ROOT, "docs", "CONVERT.md"), encoding="utf-8") as f:
        row = next(line for line in f if line.startswith("| `--format` |"))
    listed = re.findall(r"`([a-z_]+)`", row.split("|")[3])
    assert sorted(listed) == sorted(converters.available())
