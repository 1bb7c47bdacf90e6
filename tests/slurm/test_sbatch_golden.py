"""Golden files of the sbatch scripts the launcher has submitit write, for one and several nodes.

Paths are normalised: the log folder reads <LOGS>, the Python interpreter <PYTHON>. After a deliberate change,
rewrite the files with GPTLAUNCH_UPDATE_GOLDEN=1 and review the diff. test_launcher.py checks that the scripts
really submitted in a sweep match one_node.sh and four_nodes.sh.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from launch.backends.slurm.resources import SlurmResources, sbatch_script
from slurm_helpers import GOLDEN, normalise

LOGS = Path("/golden/sweep/slurm")
# What test_launcher.py's sweep asks for: model=tiny strategy=ddp cluster.time_min=10
CASES = {
    "one_node": (SlurmResources(nodes=1, time_min=10), "tiny-ddp", None),
    "four_nodes": (SlurmResources(nodes=4, time_min=10), "tiny-ddp", None),
    "gpu_nodes": (SlurmResources(nodes=8, tasks_per_node=8, gpus_per_node=8, cpus_per_task=12, time_min=720,
                                 partition="gpu", mem="480G", account="proj42", qos="high", constraint="a100",
                                 sbatch=(("exclusive", True),),
                                 setup=("module load cuda/12.4", "source ~/venv/bin/activate")),
                  "gpt2_124m-fsdp", None),
    "array_of_two": (SlurmResources(nodes=2, time_min=30, requeue=False), "tiny-ddp", 2),
}


def check_golden(name: str, script: str) -> None:
    path = GOLDEN / f"{name}.sh"
    if os.environ.get("GPTLAUNCH_UPDATE_GOLDEN"):
        path.write_text(script)  # then fail, so that an update switch left on can never pass a run
        pytest.fail(f"wrote {path}: review the diff, then run again without GPTLAUNCH_UPDATE_GOLDEN")
    assert path.exists(), f"no golden file {path}: run with GPTLAUNCH_UPDATE_GOLDEN=1 to write it"
    assert script == path.read_text(), f"the sbatch script for {name} changed; diff it against {path}"


@pytest.mark.parametrize("name", CASES)
def test_generated_sbatch_script_matches_golden(name):
    resources, job_name, array = CASES[name]
    check_golden(name, normalise(sbatch_script(resources, LOGS, job_name, array_size=array), LOGS))


def test_golden_scripts_say_what_matters():
    one, four = (GOLDEN / "one_node.sh").read_text(), (GOLDEN / "four_nodes.sh").read_text()
    for script, nodes in ((one, 1), (four, 4)):
        assert f"#SBATCH --nodes={nodes}\n" in script and "#SBATCH --requeue\n" in script
        assert "#SBATCH --signal=USR2@120\n" in script and "#SBATCH --open-mode=append\n" in script
        assert "srun --unbuffered" in script and "--kill-on-bad-exit=1" in script
    gpu = (GOLDEN / "gpu_nodes.sh").read_text()
    assert "#SBATCH --gpus-per-node=8\n#SBATCH --job-name" in gpu and "#SBATCH --ntasks-per-node=8" in gpu
    assert "#SBATCH --array=0-1%2" in (GOLDEN / "array_of_two.sh").read_text()
