"""Every gptlaunch command shown to users (README, docs/, script headers, config comments) composes with Hydra and
passes planning: a copied command never fails for a name that does not exist or a layout that cannot work."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from gpt.config.data import DataConfig
from launch import launch_config
from gpt.errors import UserError
from cuda_standin import StrictCuda
from helpers import REPO, compose, make_plan_of
from launch.planning.plan import Plan

SOURCES = ["README.md", *[str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md"))], "slurm/multi_node.sh",
           *[str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")]]
COMMAND = re.compile(r"(\$ )?(python -m launch(?![.\w])|sbatch[^`\n]*?slurm/multi_node\.sh|make run)((?:[^`\n\\]|\\\n)*)")
# hydra/sweeper=optuna's search spaces: tag(log, interval(1e-4, 3e-2)), range(50, 500, step=50), choice(a,b)
SAMPLED = re.compile(r"^(?:tag\(\w+,\s*)?(?:interval|range|choice)\(([^,)]+)")


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


def overrides(program: str, words: list[str]) -> tuple[list[list[str]], dict[str, int]]:
    """The Hydra overrides of one command, each with its values (a sweep's comma-separated ones), and sbatch's node
    and task counts."""
    out, shape = [], {}
    for w in words:
        if program == "make run" and w.startswith(("ARGS=", "RUN_ARGS=")):
            out += overrides("python -m launch", shlex.split(w.split("=", 1)[1]))[0]
        elif w.startswith(("--nodes=", "--ntasks-per-node=", "--gpus-per-node=")):
            shape[w[2:].split("=")[0]] = int(w.split("=")[1])
        elif "=" in w and not w.startswith(("-", "hydra.", "hydra/")) and "<" not in w:
            key, value = w.split("=", 1)
            if sampled := SAMPLED.match(value):  # a distribution a sweeper samples from: one value of it
                value = sampled.group(1).strip()
            out.append([f"{key}={v}" for v in ([value] if value.startswith("[") else value.split(","))])
    return out, shape


CASES = documented()


def test_the_documents_show_commands():
    assert len(CASES) >= 20 and sum("sbatch" in cmd for _, cmd, _ in CASES) >= 4
    shown_in = {source for source, _, _ in CASES}
    assert "README.md" in shown_in and {"docs/configuration.md", "docs/strategies.md", "docs/slurm.md"} <= shown_in


@pytest.mark.parametrize("source,command,words", CASES, ids=[f"{s}:{c}" for s, c, _ in CASES])
@pytest.mark.slow
def test_documented_command_composes_and_plans(source, command, words, tmp_path, data_overrides, monkeypatch):
    """Every point of a sweep: `-m nodes=1,2,4` plans 1, 2 and 4 nodes. `site=NAME` finds the example profiles."""
    monkeypatch.setenv("GPTLAUNCH_SITE_DIR", str(REPO / "examples"))
    program = "make run" if command.startswith("make run") else "sbatch" if "sbatch" in command else "launch"
    choices, shape = overrides(program, words)
    if shape.get("gpus-per-node") or "train=gpu" in words or "train.device=cuda" in words:  # planned where it runs:
        gpus = 1 if "debug.share_gpu=true" in words else shape.get("gpus-per-node", 8)  # on GPUs (the fit check's memory)
        monkeypatch.setenv("SLURM_GPUS_ON_NODE", str(gpus))
        StrictCuda(devices=gpus).install(monkeypatch)
    if program == "make run" and not any(w.startswith("RUN_ARGS=") for w in words):
        choices = [["nodes=1", "nodes=2"], ["strategy=ddp"], ["train.max_steps=1000"], *choices]  # the Makefile's RUN_ARGS
    for i, args in enumerate(itertools.product(*choices)):
        GlobalHydra.instance().clear()
        run_dir = tmp_path / f"point{i}"
        if command.startswith("$ "):
            with pytest.raises((UserError, ConfigCompositionException)):  # the schema's errors are Hydra's
                plan(program, shape, [*args, *data_overrides], run_dir)
            continue
        planned = plan(program, shape, [*args, *data_overrides], run_dir)
        assert planned.world_size >= 1 and (run_dir / "config.yaml").is_file(), args


def own_folder(data: DataConfig) -> DataConfig:
    """The session's prepared corpus, in one folder per way of preparing it: a prepared folder is never prepared
    again with other settings (gpt.data.prepare.refuse_other), and the commands use several (data=shakespeare_bpe)."""
    settings = dataclasses.replace(data, dir="", prepare_on="login", prepare_nodes=1, workers=0)
    key = hashlib.md5(repr(settings).encode(), usedforsecurity=False).hexdigest()[:12]
    return dataclasses.replace(data, dir=str(Path(data.dir).with_name(f"{Path(data.dir).name}-{key}")))


def plan(program: str, shape: dict[str, int], args: list[str], run_dir) -> Plan:
    """Planned as the allocation would run it: nodes x tasks from sbatch, or the config's."""
    run = launch_config.parse(compose(*(["cluster=srun"] if program == "sbatch" else []), *args))  # as multi_node.sh runs it
    run = dataclasses.replace(run, data=own_folder(run.data))
    if program == "sbatch":  # multi_node.sh's defaults: --nodes=2 --ntasks-per-node=1; ranks on all but the spares
        run = run.with_cluster(nodes=shape.get("nodes", 2) - run.cluster.spare_nodes,
                               tasks_per_node=shape.get("ntasks-per-node", 1))
    elif run.cluster.name == "srun":  # as the script runs it, in a 1-node allocation
        run = run.with_cluster(nodes=1, tasks_per_node=1)
    return make_plan_of(run, run_dir)


def test_the_script_header_offers_no_more_nodes_than_its_default_and_says_to_check_sinfo():
    """A larger node count copied from the header is accepted by sbatch and pends for ever on a smaller partition:
    the header's examples fit wherever its default does, and it names `sinfo` for more."""
    header = (REPO / "slurm/multi_node.sh").read_text().split("\n#SBATCH", 1)[0]
    default = int(re.search(r"^#SBATCH --nodes=(\d+)", (REPO / "slurm/multi_node.sh").read_text(), re.M).group(1))
    asked = [int(n) for n in re.findall(r"sbatch [^\n]*--nodes=(\d+)", header)]
    assert asked and max(asked) <= default, asked
    assert "sinfo" in header
