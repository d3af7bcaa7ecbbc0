"""The import graph, read from the source with `ast`: no cycle among mimkit's modules, none among the benchmark
scripts (a graph of their own), and the layers import downward only (data and models below methods, methods below
engine, engine below cli; inside the engine the loop machinery below the tasks below the drivers; the config schema
below all of them and blind to the method registry).

An edge is every `import` and `from ... import` in a module, at its top or inside a function (a lazy import is a
dependency all the same), relative ones resolved; `from .methods import X` is an edge to `mimkit.methods` (its
__init__), `from . import loop` one to `mimkit.engine.loop`. Imports under `if TYPE_CHECKING:` never run and are
left out."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mimkit"
BENCHMARKS = ROOT / "benchmarks"

# importer -> the modules it must not import (a name covers its sub-modules)
LAYERS = {
    "mimkit.data": ("mimkit.methods", "mimkit.engine", "mimkit.cli", "mimkit.cli_parser"),
    "mimkit.models": ("mimkit.methods", "mimkit.engine", "mimkit.cli", "mimkit.cli_parser"),
    "mimkit.methods": ("mimkit.engine", "mimkit.cli", "mimkit.cli_parser"),
    "mimkit.engine": ("mimkit.cli", "mimkit.cli_parser"),
    # inside the engine: the loop knows tasks (and methods) only by their contract; tasks know no driver
    "mimkit.engine.trainer": ("mimkit.engine.tasks", "mimkit.engine.drivers", "mimkit.methods"),
    "mimkit.engine.tasks": ("mimkit.engine.drivers",),
    # the schema machinery knows no registry: mimkit.run_config attaches the method sections
    **{
        schema: ("mimkit.methods", "mimkit.run_config", "mimkit.engine", "mimkit.cli", "mimkit.cli_parser")
        for schema in ("mimkit.config", "mimkit.config_schema", "mimkit.config_yaml", "mimkit.config_checks")
    },
}


def module_files(folder: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every .py under `folder`; a package by its own name (its __init__)."""
    modules = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts] if package else parts)] = path
    return modules


def is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): its imports never run, they only name types."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_statements(tree: ast.Module, top_level_only: bool):
    """Every Import/ImportFrom node, at the top or inside functions and classes, outside `if TYPE_CHECKING:`."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif is_type_checking(node):
            todo.extend(node.orelse)
        elif not (top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)):
            todo.extend(ast.iter_child_nodes(node))


def known(name: str, modules: dict) -> str | None:
    """The longest prefix of `name` that is a module of the graph (`mimkit.config.Config` -> `mimkit.config`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict, root: str) -> dict[str, int]:
    """{module of the graph that `name` imports: the line of its first import}."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    # the root package's __init__ may hand out attributes lazily: every module reaches it for __version__
    lazy_ok = name == root and bool(root)
    found: dict[str, int] = {}
    for node in import_statements(ast.parse(path.read_text(), str(path)), top_level_only=lazy_ok):
        if isinstance(node, ast.Import):
            targets = [known(alias.name, modules) for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, node.module] if node.module else parts)
            # `from pkg import sub` imports the module pkg.sub; `from pkg import thing` runs pkg's __init__
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base, modules) for a in node.names
            ]
        for target in targets:
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph(folder: Path, package: str = "") -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    modules = module_files(folder, package)
    return {name: imports_of(name, path, modules, package) for name, path in modules.items()}, modules


def strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """The groups of modules that reach each other (Tarjan), larger than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def one_cycle(group: list[str], graph: dict[str, dict]) -> list[str]:
    """The shortest import path from the group's first module back to itself: [a, b, ..., a]."""
    start, members = group[0], set(group)
    came_from: dict[str, str] = {}
    todo = deque([start])
    while todo:
        v = todo.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in came_from:
                came_from[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group always has one


def describe_cycles(graph: dict[str, dict], modules: dict[str, Path]) -> list[str]:
    lines = []
    for group in strongly_connected(graph):
        cycle = one_cycle(group, graph)
        steps = [f"{a} -> {b} ({modules[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        lines.append(f"cycle of {len(group)} modules ({', '.join(group)}):\n    " + "\n    ".join(steps))
    return lines


def test_no_import_cycle_in_mimkit():
    graph, modules = import_graph(PACKAGE, "mimkit")
    assert "mimkit.methods" in graph["mimkit.run_config"]  # the reader sees function-level imports
    cycles = describe_cycles(graph, modules)
    assert not cycles, "\n".join(cycles)


def test_no_import_cycle_among_benchmarks():
    graph, modules = import_graph(BENCHMARKS)
    assert "evidence" in graph["gpu_evidence_runs"]  # the reader sees the scripts' sibling imports
    cycles = describe_cycles(graph, modules)
    assert not cycles, "\n".join(cycles)


def test_layers_import_downward_only():
    graph, modules = import_graph(PACKAGE, "mimkit")

    def within(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    wrong = [
        f"{modules[name].relative_to(ROOT)}:{line} imports {target} ({layer} is below it)"
        for name, targets in graph.items()
        for layer, banned in LAYERS.items()
        if within(name, layer)
        for target, line in targets.items()
        if any(within(target, b) for b in banned)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_reader_finds_a_cycle_through_lazy_and_relative_imports(tmp_path):
    """The graph is read right: a function-level relative import closes a cycle; a TYPE_CHECKING import does not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def version():\n    from .c import C\n")  # the root may import lazily
    (pkg / "a.py").write_text("from .sub import helper\n")
    (pkg / "sub" / "b.py").write_text("import pkg.a\n")
    (pkg / "sub" / "__init__.py").write_text("def helper():\n    from . import b\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nfrom pkg import version\nif TYPE_CHECKING:\n    from .a import A\n"
    )
    graph, modules = import_graph(pkg, "pkg")
    assert graph == {
        "pkg": {},
        "pkg.a": {"pkg.sub": 1},
        "pkg.c": {"pkg": 2},
        "pkg.sub": {"pkg.sub.b": 2},
        "pkg.sub.b": {"pkg.a": 1},
    }
    assert strongly_connected(graph) == [["pkg.a", "pkg.sub", "pkg.sub.b"]]
    assert one_cycle(["pkg.a", "pkg.sub", "pkg.sub.b"], graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
