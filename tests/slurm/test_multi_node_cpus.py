"""slurm/multi_node.sh hands the CPUs per task on to srun (Slurm 22.05+ srun does not take them from sbatch), warns
when a GPU rank would get 1 CPU, and checks one task per GPU where GPUs were asked for. Run with Slurm's batch
variables and a stand-in for Python, no cluster."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import REPO

BATCH = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "2",
         "SLURM_NTASKS_PER_NODE": "2"}


def batch_script(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    for name, body in (("srun", "exit 0"), ("python", 'echo "launcher sees SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset}"')):
        (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
    env.update(BATCH, **variables, PATH=f"{tmp_path}:{env['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path))
    return subprocess.run(["bash", str(REPO / "slurm" / "multi_node.sh")], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("cpus, srun_cpus, warned", [("2", "2", False), ("1", "1", True)])
def test_multi_node_sh_passes_its_cpus_per_task_to_srun(cpus, srun_cpus, warned, tmp_path: Path):
    proc = batch_script(tmp_path, SLURM_CPUS_PER_TASK=cpus)
    assert proc.returncode == 0, proc.stderr
    assert f"launcher sees SRUN_CPUS_PER_TASK={srun_cpus}" in proc.stdout
    assert ("each GPU rank gets 1 CPU" in proc.stderr) == warned, proc.stderr


def test_a_task_per_gpu_is_required_when_asked_for_not_when_exclusive_handed_them(tmp_path: Path):
    asked = batch_script(tmp_path, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_PER_NODE="2")  # --gpus-per-node=2
    assert asked.returncode == 2 and "one task per GPU needs --ntasks-per-node=2" in asked.stderr
    handed = batch_script(tmp_path, SLURM_NTASKS_PER_NODE="1")  # --exclusive: Slurm allocates every GPU of the node
    assert handed.returncode == 0 and "launcher sees" in handed.stdout, handed.stderr
