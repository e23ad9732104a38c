"""The import structure of the project's packages, read from the source with ``ast``.

Every ``import`` and ``from ... import`` counts, at module level or inside a function, with
relative imports resolved. The rules: no cycles; the core (``mmllm`` outside ``mmllm.toy``)
never imports the toy world; nothing outside ``demo`` imports the demo.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmllm", "projectors", "pipelines", "demo")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to: itself, or its nearest enclosing package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """``{module: {project modules it imports}}`` (``from pkg import sub`` names ``pkg.sub``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in (_target(x, modules) for x in targets) if t is not None and t != name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_toy(module: str) -> bool:
    return module == "mmllm.toy" or module.startswith("mmllm.toy.")


def test_the_graph_is_read():
    """The reader sees relative, function-level and ``from pkg import module`` imports."""
    graph = import_graph()
    assert "mmllm.config" in graph["mmllm.model"]  # from .config import ...
    assert "mmllm.toy.world" in graph["mmllm.toy.oracle"]  # from . import world
    assert "pipelines" in graph["mmllm.model"] or "projectors" in graph["mmllm.model"]


def _core_toy_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    return {m: sorted(filter(_is_toy, deps)) for m, deps in graph.items()
            if m.split(".")[0] == "mmllm" and not _is_toy(m) and any(map(_is_toy, deps))}


def test_no_import_cycles():
    graph = import_graph()
    cycles = _cycles(graph)
    assert cycles == []


def test_the_core_does_not_import_the_toy_world():
    graph = import_graph()
    offenders = _core_toy_imports(graph)
    assert offenders == {}


def test_the_library_does_not_import_the_demo():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.split(".")[0] == "demo") for m, deps in graph.items()
                 if m.split(".")[0] != "demo" and any(d.split(".")[0] == "demo" for d in deps)}
    assert offenders == {}


@pytest.mark.parametrize("cycle", [{"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a": {"b"}, "b": {"a"}}])
def test_cycles_are_found(cycle):
    assert _cycles({**cycle, "d": {"a"}}) == [sorted(cycle)]
