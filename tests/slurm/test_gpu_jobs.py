"""GPU jobs on the local cluster, whose nodes have 2 GPUs each as a Slurm generic resource (device files, nothing
runs CUDA): Slurm allocates them, applies --gpu-bind and sets every task's CUDA_VISIBLE_DEVICES and CPUs as on a
GPU cluster. Each rank records the GPU it would drive and the CPUs Slurm gave it, the ranks check together that
no two of a node share a GPU, and the job then trains on CPU (train.device=cpu). Under cluster=slurm with
--gpu-bind=closest and under `sbatch slurm/multi_node.sh` without it (each path and each binding once; the two
jobs at a time fill the 4 nodes)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from slurm_helpers import REPO, SLURM, TINY, environments, output, run_launch, train_records

pytestmark = pytest.mark.slurm

# 2 nodes x 2 tasks, one GPU and 2 CPUs per task; two steps are enough to train
SHAPE = ["nodes=2", "cluster.tasks_per_node=2", "cluster.gpus_per_node=2", "cluster.cpus_per_task=2"]
SHORT = [*TINY, "train.max_steps=2", "train.warmup_steps=1", "train.device=cpu"]
SBATCH = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=2", "--time=10"]


def check_gpu_ranks(run_dir: Path, bind: str | None) -> None:
    """Every rank reports the GPU it would drive (its own within its node) and the 2 CPUs Slurm gave it; the run
    trained on CPU to its last step."""
    envs = environments(run_dir)
    assert [e["rank"] for e in envs] == [0, 1, 2, 3], run_dir
    gpus: dict[str, list[str]] = {}
    for e in envs:
        plan = e["gpu_plan"]
        assert (plan["visible"], plan["gpu_bind"], plan["index"]) == ("0,1", bind, int(plan["gpu"])), e
        assert (plan["cpus_per_task"], plan["cpus_on_node"], e["threads"]) == (2, 4, 2), e
        assert (e["device"], e["gpu"]) == ("cpu", None)
        gpus.setdefault(e["host"], []).append(plan["gpu"])
    assert len(gpus) == 2 and all(sorted(g) == ["0", "1"] for g in gpus.values()), gpus
    assert len(train_records(run_dir)) == 2  # both steps, logged (train.log_interval=1)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "GPUs: " in log and "rank 1 -> GPU 1" in log and "2 CPU(s) per task" in log, log


@pytest.mark.timeout(420)
def test_gpu_jobs_under_cluster_slurm_and_multi_node_sh(slurm_cluster, tmp_path, data_overrides):
    # sbatch slurm/multi_node.sh (cluster=srun) without --gpu-bind, submitted first: it runs beside the other
    run_dir, log = tmp_path / "sbatch", tmp_path / "sbatch.out"
    submit = subprocess.run(["sbatch", "--parsable", *SBATCH, f"--output={log}", str(REPO / "slurm" / "multi_node.sh"),
                             *SHORT, *data_overrides, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        # cluster=slurm, --gpu-bind=closest through the profile's sbatch flags
        proc = run_launch(slurm_cluster.env, "+cluster.sbatch.gpu-bind=closest", *SLURM, *SHAPE, *SHORT,
                          *data_overrides, f"hydra.run.dir={tmp_path / 'closest'}", timeout=300)
        assert proc.returncode == 0, output(proc)
        check_gpu_ranks(tmp_path / "closest", "closest")

        state = slurm_cluster.wait_state(job, timeout=240)
        text = log.read_text() if log.exists() else "(no job log)"
        assert state == "COMPLETED", text
        assert "gets 1 CPU" not in text, text
        check_gpu_ranks(run_dir, None)
    finally:
        slurm_cluster.run("scancel", job, check=False)
