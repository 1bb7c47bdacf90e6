"""The style's bounds, kept: no class of the project over 250 lines, no function over 60, no class name twice."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpt", "launch")


DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@functools.cache
def nodes() -> list[tuple[ast.AST, str]]:
    """Every class and function of the packages' modules, with its module's path (parsed once for all the tests
    here)."""
    return [(node, str(path.relative_to(ROOT))) for package in PACKAGES
            for path in sorted((ROOT / package).rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, DEFINITIONS)]


def sizes(kind: type | tuple[type, ...]) -> list[tuple[int, str]]:
    """(lines, file:name) of every node of `kind` in the packages."""
    return [(node.end_lineno - node.lineno + 1, f"{where}:{node.name}") for node, where in nodes()
            if isinstance(node, kind)]


def test_no_class_is_over_250_lines():
    assert [s for s in sizes(ast.ClassDef) if s[0] > 250] == []


def test_no_function_is_over_60_lines():
    assert [s for s in sizes((ast.FunctionDef, ast.AsyncFunctionDef)) if s[0] > 60] == []


def test_the_bounds_see_the_largest():
    """The walk finds classes and functions at all (a bound over nothing would pass)."""
    assert max(sizes(ast.ClassDef))[0] > 200 and max(sizes((ast.FunctionDef, ast.AsyncFunctionDef)))[0] > 40


def test_no_two_classes_share_a_name():
    """One name per concept (docs/architecture.md's glossary): a class name names one class of the project."""
    owners: dict[str, list[str]] = {}
    for _, where in sizes(ast.ClassDef):
        owners.setdefault(where.rpartition(":")[2], []).append(where)
    assert {name: places for name, places in owners.items() if len(places) > 1} == {}
