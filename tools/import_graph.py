"""The import graph of modlabel (with modlabel.train and modlabel.export): its modules, the
imports between them, its cycles, and the imports made inside functions that would close a
cycle if they were made at the top of their module (imports hidden to dodge a cycle).

Usage: python tools/import_graph.py [ROOT]   (ROOT: a checkout, default this one)

A package importing its own submodules (an ``__init__`` that re-exports) is no cycle.
``make test`` keeps the layering itself (import-linter, ``[tool.importlinter]``); this
prints the figures.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

# Folders of the checkout and the package name each ships as (pyproject's package-dir).
PACKAGES = {"modlabel": "modlabel", "train": "modlabel.train", "export": "modlabel.export"}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def targets(known: dict[str, Path], module: str, node: ast.AST, package: bool) -> list[str]:
    """The modules of ``known`` that one import statement of ``module`` imports."""
    if isinstance(node, ast.ImportFrom):
        base = module if package else module.rpartition(".")[0]
        if node.level:
            base = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
            named = base + ("." + node.module if node.module else "")
        else:
            named = node.module or ""
        names = [f"{named}.{alias.name}" for alias in node.names]
        names = [n if n in known else named for n in names]
    else:
        names = [alias.name for alias in node.names]
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def graph(root: Path) -> tuple[dict[str, Path], set[tuple[str, str]], set[tuple[str, str]]]:
    """(modules, imports at the top of a module, imports inside a function)."""
    known = modules(root)
    top: set[tuple[str, str]] = set()
    inner: set[tuple[str, str]] = set()
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        in_function = {
            id(node)
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(function)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges = inner if id(node) in in_function else top
                for target in targets(known, module, node, path.name == "__init__.py"):
                    if not target.startswith(module + "."):  # a package's own submodule
                        edges.add((module, target))
    return known, top, inner - top


def reaches(edges: set[tuple[str, str]], start: str, goal: str) -> bool:
    after = defaultdict(list)
    for a, b in edges:
        after[a].append(b)
    seen, todo = {start}, [start]
    while todo:
        for b in after[todo.pop()]:
            if b == goal:
                return True
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return False


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The graph's strongly connected groups of more than one module (Tarjan)."""
    after = defaultdict(list)
    for a, b in edges:
        after[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in after[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted({a for a, _ in edges} | {b for _, b in edges}):
        if v not in index:
            visit(v)
    return groups


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    known, top, inner = graph(root)
    found = cycles(top | inner)
    hidden = sorted((a, b) for a, b in inner if reaches(top, b, a))
    print(f"modules: {len(known)}")
    print(f"imports between them: {len(top | inner)} ({len(inner)} only inside functions)")
    print(f"import cycles: {len(found)}")
    for group in found:
        print("  " + " <-> ".join(group))
    print(f"imports inside functions that would close a cycle at the top: {len(hidden)}")
    for a, b in hidden:
        print(f"  {a} -> {b}")
    sizes = sorted(((len(p.read_text().splitlines()), p) for p in known.values()), reverse=True)
    print("largest files: " + ", ".join(f"{p.relative_to(root)} {n}" for n, p in sizes[:3]))


if __name__ == "__main__":
    main()
