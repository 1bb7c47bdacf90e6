"""Code outside gpt/parallel asks a strategy what it is (gpt.parallel.traits), never which one it is: no strategy
name is compared as a string there, so a new layout needs no edit elsewhere."""
from __future__ import annotations

import re

from helpers import REPO
from gpt.parallel.traits import REGISTRY

NAMES = "|".join(REGISTRY)
COMPARED = re.compile(rf"""(==|!=|\bin)\s*[(\[{{]?\s*["']({NAMES})["']|["']({NAMES})["']\s*(==|!=|\bin\b)""")


def test_no_strategy_name_is_compared_outside_gpt_parallel():
    found = []
    for folder in ("gpt", "launch", "benchmarks", "hydra_plugins", "slurm"):
        for path in (REPO / folder).rglob("*.py"):
            if (REPO / "gpt" / "parallel") in path.parents:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if COMPARED.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_pattern_finds_a_comparison():
    assert COMPARED.search('deepspeed = "deepspeed" in (written_by, name)')
    assert COMPARED.search('if s.strategy == "pipeline":')
    assert not COMPARED.search('strategy=str(get(cfg, "strategy.name", "single")),')
