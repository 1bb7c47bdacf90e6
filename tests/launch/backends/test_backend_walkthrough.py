"""docs/backends.md stays true: every method it documents exists on the interface (a backend, its queue, its job), and
its walk-through of adding a scheduler (PBS) names every file that registers a backend by name, and a counterpart of
every Slurm module the registries name."""
from __future__ import annotations

import re

from helpers import REPO
from launch.backends import IN_JOB_BACKENDS, JOB_ENVIRONMENTS, REGISTRY, Backend, Queue
from launch.rank.job_env import JobEnvironment

DOC = (REPO / "docs" / "backends.md").read_text()
WALKTHROUGH = DOC[DOC.index("## Adding PBS"):]
REGISTERS = re.compile(r"""^\s*["']slurm["']\s*:|["']launch\.backends\.slurm\.[\w.]+:\w+["']""", re.M)


def listed(heading: str) -> set[str]:
    part = WALKTHROUGH[WALKTHROUGH.index(heading):].split("\n\n", 2)[1]
    return {m for m in re.findall(r"^- `([^`]+)`", part, re.M)}


def test_every_documented_method_exists():
    tables = DOC[DOC.index("## The two halves"):DOC.index("## Adding PBS")]
    names = set(re.findall(r"`(\w+)\(", tables))
    missing = sorted(n for n in names if not any(hasattr(c, n) for c in (Backend, Queue, JobEnvironment)))
    assert not missing, missing
    assert {"check", "submit_all", "standings", "place", "requeue"} <= names


def test_the_walkthrough_names_every_file_that_registers_a_backend():
    registering = {str(p.relative_to(REPO)) for d in ("launch", "gpt", "hydra_plugins") for p in (REPO / d).rglob("*.py")
                   if not p.is_relative_to(REPO / "launch" / "backends" / "slurm") and REGISTERS.search(p.read_text())}
    assert "launch/backends/__init__.py" in registering
    assert listed("Files to change:") == registering | {"docs/configuration.md"}


def test_the_walkthrough_adds_a_counterpart_of_every_slurm_module_the_registries_name():
    added = listed("Files to add:")
    named = {path.split(":")[0] for path in [*REGISTRY.values(), *JOB_ENVIRONMENTS]} - \
        {path.split(":")[0] for path in IN_JOB_BACKENDS}  # hydra-submitit-launcher's jobs are Slurm's alone
    slurm = {m.replace(".", "/") + ".py" for m in named if m.startswith("launch.backends.slurm.")}
    assert slurm and {f.replace("/slurm/", "/pbs/") for f in slurm} <= added
    for f in added:
        if f.startswith("launch/backends/pbs/"):
            assert (REPO / f.replace("/pbs/", "/slurm/")).is_file(), f"{f}: no Slurm counterpart to follow"
    assert "configs/cluster/pbs.yaml" in added and (REPO / "configs/cluster/slurm.yaml").is_file()
