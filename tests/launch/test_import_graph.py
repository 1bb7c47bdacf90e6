"""No import cycle in launch/ or gpt/, counting every import (a lazy import inside a function hides a cycle
from Python, not from a reader)."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in ("launch", "gpt") for p in (REPO / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            targets |= {n for n in names if n in modules and n != name}
        # a package's __init__ is imported with any of its modules, but does not import them back
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    return edges


def test_no_module_imports_itself_back():
    edges, cycles = graph(), []

    def visit(node: str, path: list[str], seen: set[str]) -> None:
        for nxt in edges[node]:
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, [*path, nxt], seen)

    for start in edges:
        visit(start, [start], {start})
    assert not cycles, "\n".join(sorted(set(cycles))[:10])
    assert "launch.report.build" in edges and "launch.backends.slurm.submit" in edges
