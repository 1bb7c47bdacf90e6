"""docs/benchmarks.md's current figures stay traceable: every row of its headline table links an entry of the results
log, docs/results.md, that exists, and every entry of the log names its date and device."""
from __future__ import annotations

import re

from helpers import REPO

BENCHMARKS = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "docs" / "results.md"
HEADLINE = "Current figures"
LINK = re.compile(r"\]\(results\.md#([^)\s]+)\)")
DATE = re.compile(r"^- date: \d{4}-\d{2}-\d{2}\b", re.M)
DEVICE = re.compile(r"^- device: \S", re.M)


def anchor(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lowercase, spaces to '-', punctuation other than '-' and '_' removed."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def entries(text: str) -> list[tuple[str, str]]:
    """The results log's entries, in order: (anchor of the `## ` heading, the text under it up to the next one)."""
    return [(anchor(block.partition("\n")[0]), block.partition("\n")[2])
            for block in re.split(r"^## ", text, flags=re.M)[1:]]


def headline_rows(text: str) -> list[str]:
    """The figure rows of the first table under `## Current figures` (its header and separator left out)."""
    section = text.split(f"\n## {HEADLINE}\n", 1)[1].split("\n## ", 1)[0]
    table = re.search(r"^\|.*(?:\n\|.*)*", section, re.M)
    return table.group(0).splitlines()[2:] if table else []


def unlinked(rows: list[str], anchors: set[str]) -> list[str]:
    """The rows that link no entry of the log, or link one that does not exist."""
    return [row for row in rows if not LINK.findall(row) or any(a not in anchors for a in LINK.findall(row))]


def undated(found: list[tuple[str, str]]) -> list[str]:
    """The entries without a `- date: YYYY-MM-DD` line or a `- device: ...` line."""
    return [name for name, body in found if not (DATE.search(body) and DEVICE.search(body))]


def test_every_current_figure_links_its_entry_in_the_results_log():
    rows = headline_rows(BENCHMARKS.read_text())
    assert len(rows) >= 20, rows
    anchors = {name for name, _ in entries(RESULTS.read_text())}
    assert not unlinked(rows, anchors), f"rows of {BENCHMARKS.name}'s '{HEADLINE}' that link no entry of " \
                                        f"{RESULTS.name} (or a missing one): {unlinked(rows, anchors)}"


def test_every_entry_of_the_results_log_names_its_date_and_device():
    found = entries(RESULTS.read_text())
    assert len(found) >= 20
    assert not undated(found), f"entries of {RESULTS.name} without '- date: YYYY-MM-DD' and '- device:': " \
                               f"{undated(found)}"
    names = [name for name, _ in found]
    assert len(set(names)) == len(names), "two entries share a heading, and so an anchor"


def test_links_into_the_results_log_and_the_benchmarks_page_resolve():
    """README.md and docs/ link sections of these two pages by anchor; a renamed or moved section breaks none."""
    targets = {page.name: {anchor(h) for h in re.findall(r"^#+ (.*)", page.read_text(), re.M)}
               for page in (BENCHMARKS, RESULTS)}
    broken = [(source.relative_to(REPO).as_posix(), page, name)
              for source in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
              for page, name in re.findall(r"\((?:docs/)?(benchmarks\.md|results\.md)#([^)\s]+)\)", source.read_text())
              if name not in targets[page]]
    assert not broken, f"links to sections that do not exist: {broken}"


def test_the_parsers_see_a_broken_link_a_missing_link_and_an_undated_entry():
    """The checks can fail: a row linking an entry that does not exist, a row linking none, and an entry without a
    date are each seen; headings become GitHub's anchors."""
    log = ("# log\n\n## 2026-01-02: a run, on `x` (one GPU)\n\n- date: 2026-01-02\n- device: one GPU\n\n"
           "## 2026-01-03: no date line\n\n- device: 2 CPU cores\n\n```bash\n# a comment\n```\n")
    found = entries(log)
    assert [name for name, _ in found] == ["2026-01-02-a-run-on-x-one-gpu", "2026-01-03-no-date-line"]
    assert undated(found) == ["2026-01-03-no-date-line"]
    page = ("# b\n\n## Current figures\n\nintro\n\n| command | entry |\n|---|---|\n"
            "| ok | [2026-01-02](results.md#2026-01-02-a-run-on-x-one-gpu) |\n"
            "| broken | [2026-01-04](results.md#2026-01-04-gone) |\n| none | 1.0 |\n\n## Next\n\n| x |\n|---|\n| y |\n")
    rows = headline_rows(page)
    assert [row.split(" | ")[0] for row in rows] == ["| ok", "| broken", "| none"]
    assert unlinked(rows, {name for name, _ in found}) == rows[1:]
    assert anchor("The step's flags: gloo's ring (2-32 ranks), `x_y`") == "the-steps-flags-gloos-ring-2-32-ranks-x_y"
