"""Every gptlaunch command shown to users (README, script headers, config comments) composes with Hydra and
passes planning: a copied command never fails for a name that does not exist or a layout that cannot work."""
from __future__ import annotations

import re
import shlex

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from gpt.errors import UserError
from helpers import REPO, compose
from launch.plan import make_plan

SOURCES = ["README.md", "slurm/multi_node.sh", *[str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")]]
COMMAND = re.compile(r"(\$ )?(python -m launch(?![.\w])|sbatch[^`\n]*?slurm/multi_node\.sh|make run)((?:[^`\n\\]|\\\n)*)")


def documented() -> list[tuple[str, str, list[str]]]:
    """(source, the command as shown, its words after the program). A command shown after `$ ` is an example
    of an error, and must fail planning."""
    found = []
    for source in SOURCES:
        text = (REPO / source).read_text()
        for m in COMMAND.finditer(text):
            rest = re.sub(r"\\\n\s*#?", " ", m.group(3)).split(" #")[0].replace("&", " ")  # continued lines
            shown = ((m.group(1) or "") + m.group(2) + m.group(3)).strip()[:100]
            found.append((source, shown, shlex.split(m.group(2).split("slurm/multi_node.sh")[0]) + shlex.split(rest)))
    return found


def overrides(program: str, words: list[str]) -> tuple[list[str], dict[str, int]]:
    """The Hydra overrides of one command (the first value of a sweep), and sbatch's node and task counts."""
    out, shape = [], {}
    for w in words:
        if program == "make run" and w.startswith(("ARGS=", "RUN_ARGS=")):
            out += overrides("python -m launch", shlex.split(w.split("=", 1)[1]))[0]
        elif w.startswith(("--nodes=", "--ntasks-per-node=")):
            shape[w[2:].split("=")[0]] = int(w.split("=")[1])
        elif "=" in w and not w.startswith(("-", "hydra.", "hydra/")) and "<" not in w:
            key, value = w.split("=", 1)
            out.append(f"{key}={value.split(',')[0] if not value.startswith('[') else value}")
    return out, shape


CASES = documented()


def test_the_documents_show_commands():
    assert len(CASES) >= 20 and sum("sbatch" in cmd for _, cmd, _ in CASES) >= 4


@pytest.mark.parametrize("source,command,words", CASES, ids=[f"{s}:{c}" for s, c, _ in CASES])
def test_documented_command_composes_and_plans(source, command, words, tmp_path, data_overrides):
    program = "make run" if command.startswith("make run") else "sbatch" if "sbatch" in command else "launch"
    args, shape = overrides(program, words)
    if program == "make run" and not any(w.startswith("RUN_ARGS=") for w in words):
        args = ["nodes=1", "strategy=ddp", "train.max_steps=1000", *args]  # the Makefile's RUN_ARGS
    GlobalHydra.instance().clear()
    cfg = compose(*args, *data_overrides)
    with open_dict(cfg):  # planned as the allocation would run it: nodes x tasks from sbatch, or the config's
        if program == "sbatch":  # multi_node.sh's defaults: --nodes=2 --ntasks-per-node=1
            cfg.cluster.nodes, cfg.cluster.tasks_per_node = shape.get("nodes", 2), shape.get("ntasks-per-node", 1)
        elif cfg.cluster.name == "srun":  # as the script runs it, in a 1-node allocation
            cfg.cluster.nodes, cfg.cluster.tasks_per_node = 1, 1
    if command.startswith("$ "):
        with pytest.raises(UserError):
            make_plan(cfg, tmp_path / "run")
        return
    plan = make_plan(cfg, tmp_path / "run")
    assert plan.world_size >= 1 and (tmp_path / "run" / "config.yaml").is_file()
