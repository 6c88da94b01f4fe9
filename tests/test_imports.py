"""The package has no import cycles, counting every import statement in it.

Each `import X` and `from X import Y` is an edge, wherever it stands: at module level, inside a
function (an import put there to break a cycle still makes one), under `if TYPE_CHECKING:`.
`from pkg import name` points at the submodule `pkg.name` when there is one, else at `pkg`.
Imports of modules outside the package are left out.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pipeline"


def module_names(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module if is_package else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        base = base.rsplit(".", 1)[0]
    return f"{base}.{node.module}" if node.module else base


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports, anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import a.b.c` imports a.b.c; a name that is not a module counts as its nearest module.
                prefixes = (alias.name.rsplit(".", cut)[0] for cut in range(alias.name.count(".") + 1))
                target = next((name for name in prefixes if name in known), None)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path.name == "__init__.py", node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    found.add(submodule)
                elif base in known:
                    found.add(base)
    found.discard(module)
    return found


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    names = module_names(package)
    return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
            connect(v)
    return [_cycle_in(graph, set(group)) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in {sorted(group)}")


def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycle(s): " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_walk_sees_imports_in_functions_and_under_type_checking():
    graph = import_graph()
    assert "pipeline.demo" in graph["pipeline.cli"]  # inside build_parser()
    assert "pipeline.report_drift" in graph["pipeline.report"]  # under `if TYPE_CHECKING:`
    assert {"pipeline.reasons", "pipeline.records"} <= graph["pipeline.embed"]  # `from pipeline import reasons, ...`
    assert all(target.startswith("pipeline") for targets in graph.values() for target in targets)


def test_a_cycle_is_found_and_named():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a", "p.d"}, "p.d": set(), "p.e": {"p.e"}}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
