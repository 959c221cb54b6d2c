"""The shape of virtnbd/ (docs/ARCHITECTURE.md): no import circle, no function over 60 lines, median <= 8.

Pure logic over the source's AST: the checks are functions of a {module: source} map, and
each is shown to fail on a made-up package that breaks it, so they cannot pass vacuously.
"""
from __future__ import annotations

import ast
import statistics
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "virtnbd"
MAX_LINES = 60
MAX_MEDIAN = 8


def read_package(root: Path) -> dict[str, str]:
    """{dotted module name: source} of every .py file under ``root`` (a package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text(encoding="utf-8")
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, source: str, modules: Mapping[str, str], is_package: bool = False) -> set[str]:
    """Modules of ``modules`` that ``module`` imports, at any depth of its code (lazy imports count).

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != module}


def import_graph(modules: Mapping[str, str], packages: set[str] | None = None) -> dict[str, set[str]]:
    packages = packages or set()
    return {name: imports_of(name, src, modules, name in packages) for name, src in modules.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def function_lengths(modules: Mapping[str, str]) -> Iterator[tuple[str, int]]:
    """(module:function, lines from ``def`` to its last line) of every function and method."""
    for name, source in modules.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{name}:{node.name}", (node.end_lineno or node.lineno) - node.lineno + 1


def _package_names(root: Path) -> set[str]:
    return {".".join(p.parent.relative_to(root.parent).parts) for p in root.rglob("__init__.py")}


# -- the real package ---------------------------------------------------------------

def test_no_import_circle_inside_virtnbd() -> None:
    modules = read_package(PACKAGE)
    assert len(modules) > 40
    graph = import_graph(modules, _package_names(PACKAGE))
    assert sum(len(v) for v in graph.values()) > 100          # the edges are really found
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"


def test_no_function_over_60_lines_and_median_at_most_8() -> None:
    lengths = dict(function_lengths(read_package(PACKAGE)))
    assert len(lengths) > 300
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"functions over {MAX_LINES} lines: {too_long}"
    assert statistics.median(lengths.values()) <= MAX_MEDIAN


# -- the checks fail when they must --------------------------------------------------

def test_a_circle_is_found_lazy_relative_and_through_from_imports() -> None:
    fake = {
        "p": "",
        "p.a": "from p import b\n",
        "p.b": "def f():\n    from .c import g\n",       # a lazy, relative import
        "p.c": "import p.a\n",
        "p.d": "from p.a import x\n",
    }
    graph = import_graph(fake, {"p"})
    assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.c"} and graph["p.c"] == {"p.a"}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    del fake["p.c"]
    assert find_cycle(import_graph(fake, {"p"})) is None


def test_long_functions_and_median_are_measured() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    fake = {"p.m": f"def long():\n{body}\n\nclass C:\n    def short(self):\n        return 1\n"}
    lengths = dict(function_lengths(fake))
    assert lengths == {"p.m:long": 62, "p.m:short": 2}
    assert statistics.median(lengths.values()) > MAX_MEDIAN
