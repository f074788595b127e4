"""The import graph of the project's packages (module-level and function-level imports, not the
ones under `if TYPE_CHECKING:`): no cycles, and each layer imports only the layers above it
(engine <- stages <- cluster <- serving <- lightx2v; ../shared/ARCHITECTURE.md)."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("engine", "stages", "cluster", "serving", "lightx2v")


def _modules() -> dict[str, str]:
    mods = {}
    for package in LAYERS:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    mods[name.removesuffix(".__init__")] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: str, module: str, is_package: bool) -> set[str]:
    """Dotted names imported anywhere in the file except TYPE_CHECKING blocks."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    with open(path, encoding="utf-8") as f:
        visit(ast.parse(f.read()))
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in mods.items():
        targets = {owner(n) for n in _imports(path, module, path.endswith("__init__.py"))}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_layers_import_only_the_layers_above():
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = [(m, t) for m, targets in _graph().items() for t in targets
             if rank[t.split(".")[0]] > rank[m.split(".")[0]]]
    assert wrong == []


def test_the_registry_and_kernels_import_no_model():
    graph = _graph()
    for module, targets in graph.items():
        if module == "engine.registry" or module.startswith("engine.kernels"):
            assert not [t for t in targets if t.startswith("engine.models")], module
