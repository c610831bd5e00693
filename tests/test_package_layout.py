"""The package's shape: no import cycles between streamshard modules (lazy imports inside
functions count too: a cycle is a design smell even when Python tolerates it)."""

from __future__ import annotations

import ast
import os

from tests.layout import ROOT, SOURCES, modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the streamshard modules it imports (at any depth of its code)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                # `from pkg import submodule` depends on the submodule, not on the package body
                deps.update(subs or ({node.module} & mods.keys()))
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    # the checker itself can fail: a -> b -> c -> a is one component, d hangs off it
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "streamshard.cli" in graph and "streamshard.converters.packing" in graph
    assert cycles(graph) == []


def test_every_package_directory_is_in_pyproject_packages():
    """The package-dir mapping needs an explicit package list: a new subpackage missing from it
    would be left out of the wheel."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapping = setuptools.get("package-dir", {})
    found = set()
    for folder, package in SOURCES.items():
        base = os.path.join(ROOT, folder)
        assert mapping.get(package, folder) == folder or package == folder
        for directory, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(directory, base)
                found.add(package if rel == "." else ".".join([package, *rel.split(os.sep)]))
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"
