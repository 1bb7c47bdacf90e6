"""docs/architecture.md stays true: its module list names every module of the packages and nothing else, and every
path it names exists."""
from __future__ import annotations

import re
from helpers import REPO

DOC = REPO / "docs" / "architecture.md"
PACKAGES = ("launch", "gpt", "benchmarks", "hydra_plugins")
WRITTEN = {"benchmarks/results/"}  # folders the code writes, absent from a fresh clone


def documented_modules(text: str) -> dict[str, str]:
    """The modules of the doc's `## Modules` tables, as paths from the repository root: each row's first cell names
    modules relative to the `### PACKAGE/` heading above it; the second cell says what they hold."""
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    modules, package = {}, None
    for line in section.splitlines():
        heading = re.fullmatch(r"### (\w+)/", line)
        if heading:
            package = heading.group(1)
        elif line.startswith("| `") and package is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`([^`]+\.py)`", cells[0]):
                modules[f"{package}/{name}"] = cells[1]
    return modules


def tree_modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for package in PACKAGES for p in (REPO / package).rglob("*.py")
            if "__pycache__" not in p.parts}


def test_the_module_list_is_the_tree():
    documented = documented_modules(DOC.read_text())
    tree = tree_modules()
    assert not sorted(tree - set(documented)), f"modules missing from {DOC.name}'s list: {sorted(tree - set(documented))}"
    assert not sorted(set(documented) - tree), f"{DOC.name} lists modules that do not exist: " \
                                                f"{sorted(set(documented) - tree)}"
    assert all(documented.values()), "every module gets a line that says what it holds"


def test_every_path_the_doc_names_exists():
    named = re.findall(r"`((?:launch|gpt|benchmarks|hydra_plugins|tests|slurm|configs)/[\w/.-]+)`", DOC.read_text())
    assert named, "the doc names paths from the repository root"
    assert not [p for p in named if p not in WRITTEN and not (REPO / p).exists()]


def test_the_doc_list_parser_reads_both_ways(tmp_path):
    """The comparison can fail: a row without a module, and a module without a row, are both seen."""
    text = "# x\n\n## Modules\n\n### gpt/\n\n| module | holds |\n|---|---|\n| `gone.py`, `errors.py` | both |\n\n## Next\n"
    documented = documented_modules(text)
    assert set(documented) == {"gpt/gone.py", "gpt/errors.py"}
    assert "gpt/gone.py" not in tree_modules() and "gpt/run_folder.py" not in documented
