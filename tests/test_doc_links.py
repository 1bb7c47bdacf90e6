"""Every link of README.md and docs/ to a page of the project resolves: the file exists, and a `#section` names one
of its headings (as GitHub makes the anchors). A page moved, a section renamed or a README trimmed breaks no link."""
from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO
from test_docs_results import anchor

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s#]*)(?:#([^)\s]+))?\)")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # a `# comment` in a code block is no heading
    return {anchor(h) for h in re.findall(r"^#+ (.*)", text, re.M)}


def broken(page: Path) -> list[str]:
    found = []
    for target, section in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")) or (target and not target.endswith(".md")):
            continue
        linked = (page.parent / target).resolve() if target else page
        if not linked.is_file():
            found.append(f"{target}#{section}" if section else target)
        elif section and section not in anchors(linked):
            found.append(f"{target}#{section}")
    return found


def test_every_link_between_the_pages_resolves():
    bad = {page.relative_to(REPO).as_posix(): broken(page) for page in PAGES}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_a_missing_page_and_a_missing_section_are_seen(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\n## Its part\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#its-part) [gone](c.md) [no such part](a.md#not-a-heading) [here](#b) [x](https://x)\n"
                    "# B\n")
    assert broken(page) == ["c.md", "a.md#not-a-heading"]
