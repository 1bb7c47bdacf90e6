"""docs/fault-tolerance.md's table of every interruption against every entry point: each cell names a test that
exists (a Slurm scenario where the cell is about Slurm), or says why it cannot happen, or what is still open."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "fault-tolerance.md"
# `sbatch` `slurm/multi_node.sh` in two spans: as one, tests/launch/test_documented_commands.py would plan it as a command
SECTION = "## Every interruption, every entry point"
ROWS = ["a user's cancel", "a preemption under REQUEUE", "a preemption under CANCEL", "the time limit", "a lost node",
        "a killed rank", "a hang", "a NaN or spike", "a full disk", "a Slurm outage",
        "a corpus changed or only touched"]
COLUMNS = ["`cluster=slurm`", "`sbatch` `slurm/multi_node.sh`", "a sweep", "a packed sweep",
           "an Optuna search with early stopping", "a chain", "`cluster=local`"]
# the rows whose cells, off cluster=local, are about Slurm itself: a Slurm scenario must show them
SLURM_ROWS = set(ROWS[:7]) | {"a Slurm outage"}
NODE_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(\[[^`]*\])?`")
KINDS = ("cannot happen:", "open:")


def table(text: str) -> tuple[list[str], dict[str, list[str]], str]:
    """The header, each row's cells by the row's name (its note's number left off), and the notes under it."""
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [x for x in section.splitlines() if x.startswith("|")]
    cells = [[c.strip() for c in x.strip().strip("|").split(" | ")] for x in lines]
    header, body = cells[0], cells[2:]
    rows = {re.sub(r"\s*\[\d+\]$", "", r[0]): r[1:] for r in body}
    return header[1:], rows, section


def problems(text: str, repo: Path = REPO) -> list[str]:
    """Everything wrong with the table, one line each."""
    header, rows, section = table(text)
    found = [] if header == COLUMNS else [f"columns {header}, not {COLUMNS}"]
    if list(rows) != ROWS:
        found.append(f"rows {list(rows)}, not {ROWS}")
    notes = set(re.findall(r"^(\d+)\. ", section, re.M))
    for row, cells in rows.items():
        if len(cells) != len(COLUMNS):
            found.append(f"{row}: {len(cells)} cells, not {len(COLUMNS)}")
        for column, cell in zip(COLUMNS, cells):
            found += [f"{row} / {column}: {p}" for p in cell_problems(row, column, cell, repo)]
    refs = set(re.findall(r"\[(\d+)\]", "\n".join(x for x in section.splitlines() if x.startswith("|"))))
    found += [f"note [{n}] is referred to but not written under the table" for n in sorted(refs - notes)]
    return found


def cell_problems(row: str, column: str, cell: str, repo: Path) -> list[str]:
    kind = next((k for k in KINDS if cell.startswith(k)), None)
    tests = NODE_ID.findall(cell)
    found = [missing for path, name, _ in tests if (missing := absent(repo, path, name))]
    if kind is not None:
        return found + ([] if len(cell) > len(kind) + 10 else [f"'{kind}' without a reason"])
    if not tests:
        return found + ["names no test, and says neither 'cannot happen:' nor 'open:'"]
    if row in SLURM_ROWS and column != "`cluster=local`" and not any(p.startswith("tests/slurm/") for p, _, _ in tests):
        found.append("a cell about Slurm names no Slurm scenario (tests/slurm/)")
    return found


def absent(repo: Path, path: str, name: str) -> str | None:
    file = repo / path
    if not file.is_file():
        return f"{path} does not exist"
    if not re.search(rf"^\s*def {name}\(", file.read_text(), re.M):
        return f"{path} has no test {name}"
    return None


def counts(text: str) -> dict[str, int]:
    _, rows, _ = table(text)
    cells = [c for r in rows.values() for c in r]
    open_, cannot = (sum(c.startswith(k) for c in cells) for k in ("open:", "cannot happen:"))
    return {"tested": len(cells) - open_ - cannot, "cannot happen": cannot, "open": open_}


def test_every_cell_names_a_test_that_exists_or_says_why_not():
    assert problems(DOC.read_text()) == []


def test_the_table_counts_every_cell_once():
    assert sum(counts(DOC.read_text()).values()) == len(ROWS) * len(COLUMNS)


@pytest.mark.parametrize("break_it, said", [
    (lambda t: t.replace("test_a_plain_scancel_is_never_said_to_be_requeued`", "test_no_such_test`", 1),
     "has no test test_no_such_test"),
    (lambda t: t.replace("`tests/slurm/test_multi_node_script.py::", "`tests/slurm/no_such_file.py::", 1),
     "no_such_file.py does not exist"),
    (lambda t: t.replace("| cannot happen: a local run has no time limit |", "| nothing |", 1),
     "names no test, and says neither"),
    (lambda t: t.replace("| `tests/slurm/test_waiter.py::test_a_slurm_outage_leaves_every_job_tracked` |",
                         "| `tests/launch/test_scheduler_outage.py::test_status_and_list_say_unknown_not_failed` |", 1),
     "a Slurm outage / a sweep: a cell about Slurm names no Slurm scenario"),
    (lambda t: t.replace("| a chain |", "| a chain link |", 1), "columns"),
    (lambda t: t.replace("| a hang [7] |", "| a stall [7] |", 1), "rows"),
    (lambda t: t.replace(" | cannot happen: no scheduler preempts a local run |", " |", 1), "6 cells, not 7"),
])
def test_a_broken_cell_is_found(break_it, said):
    text = DOC.read_text()
    broken = break_it(text)
    assert broken != text, "the cell to break is no longer in the table"
    assert any(said in p for p in problems(broken)), problems(broken)
