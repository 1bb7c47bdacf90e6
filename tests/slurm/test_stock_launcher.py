"""hydra-submitit-launcher, the stock plugin, on the local cluster: every task of its job becomes a rank, a
preemption signal saves, requeues and resumes the point bitwise, and a killed rank restarts inside the allocation,
as under gptlaunch's own launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slurm_helpers
from helpers import REPO
from slurm_helpers import TINY, launch_cmd, losses, output
from test_slurm_preemption import urgent_job

pytestmark = pytest.mark.slurm
STEPS = 60
RUN = [o for o in TINY if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))] + [
    f"train.max_steps={STEPS}", "checkpoint.interval_steps=5", "debug.delay_rank=0", "debug.delay_s=0.1"]
# One CPU per task, as the local reference's two ranks on this machine's two CPUs: equal thread counts give
# bitwise equal sums.
STOCK = ["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10",
         "hydra.launcher.max_num_timeout=3", "hydra.sweep.subdir=lr${train.lr}"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from gpt.checkpoint.writer import load_model

    model, meta, _ = load_model(run_dir)
    assert meta["step"] == STEPS
    return model.state_dict()


def job_of(run_dir: Path, deadline: float) -> tuple[str, str]:
    """The Slurm job a point runs in, once its rank 0 has trained a few steps: its own id, and the id squeue and the
    attempts log know it by (ARRAY_TASK: the stock launcher submits a sweep of several points as one array)."""
    while time.monotonic() < deadline:
        metrics, env = run_dir / "metrics" / "rank0.jsonl", run_dir / "environment" / "rank0.json"
        if metrics.exists() and metrics.read_text().count("\n") >= 10 and env.exists():
            slurm = json.loads(env.read_text())["scheduler"]
            array = "SLURM_ARRAY_JOB_ID" in slurm
            return slurm["SLURM_JOB_ID"], (f"{slurm['SLURM_ARRAY_JOB_ID']}_{slurm['SLURM_ARRAY_TASK_ID']}" if array
                                           else slurm["SLURM_JOB_ID"])
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} never trained")


def local_reference(tmp_path: Path, data_overrides: list[str]) -> Path:
    """The uninterrupted run of the point lr0.001, local; it also prepares the data, before two jobs could race to."""
    return slurm_helpers.local_reference(tmp_path / "reference", "train.lr=0.001", *RUN, *data_overrides)


def stock_sweep(slurm_cluster, tmp_path: Path, overrides: list[str], meanwhile) -> tuple[Path, tuple[str, str]]:
    """`python -m launch -m` under the stock launcher; `meanwhile(sweep)` acts on it while it runs and returns the
    job it acted on (job_of's). The sweep must end 0, and submitit's watcher read Slurm's own accounting (no sacct
    warning). Returns the sweep folder and that job."""
    sweep = tmp_path / "sweep"
    cmd = launch_cmd("-m", *STOCK, *overrides, *RUN, f"hydra.sweep.dir={sweep}")
    with (tmp_path / "out").open("w") as out:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=slurm_cluster.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            job = meanwhile(sweep)
            code = launcher.wait(timeout=300)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    text = (tmp_path / "out").read_text()
    assert code == 0, text[-6000:]
    assert "Bypassing sacct error" not in text, text[-6000:]
    return sweep, job


@pytest.mark.timeout(420)
def test_lr_sweep_under_the_stock_launcher_survives_a_preemption(slurm_cluster, tmp_path, data_overrides):
    reference = local_reference(tmp_path, data_overrides)

    def meanwhile(sweep: Path) -> tuple[str, str]:
        job, task = job_of(sweep / "lr0.001", time.monotonic() + 180)
        listed = subprocess.run([sys.executable, "-m", "launch.list", str(sweep)], cwd=REPO, env=slurm_cluster.env,
                                capture_output=True, text=True, timeout=60)  # no slurm_job.json: the ranks say
        assert "lr0.001: running, step " in listed.stdout and f"job {task} RUNNING" in listed.stdout, output(listed)
        slurm_cluster.run("scancel", "--signal=USR2", task)  # the array task: its SLURM_JOB_ID may be the array's
        job_of(sweep / "lr0.003", time.monotonic() + 180)  # the other point loses a rank: an in-job restart
        os.kill(json.loads((sweep / "lr0.003" / "environment" / "rank1.json").read_text())["pid"], 9)
        return job, task

    sweep, (_, task) = stock_sweep(slurm_cluster, tmp_path, ["train.lr=0.003,0.001", *data_overrides], meanwhile)

    point = sweep / "lr0.001"
    attempts = [json.loads(x) for x in (point / "attempts.jsonl").read_text().splitlines()]
    assert [a["ended"] for a in attempts] == ["preempted:SIGUSR2", "finished"], attempts
    assert attempts[0]["requeued"] and attempts[1]["restart"] == 1 and attempts[1]["job_id"] == task
    assert losses(point) == losses(reference)  # bitwise, every step once
    a, b = final_weights(point), final_weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = sweep / "lr0.003"
    assert len(losses(other)) == STEPS and losses(other) != losses(point)
    restarted = [json.loads(x) for x in (other / "attempts.jsonl").read_text().splitlines()]
    assert [(a.get("in_job_restart"), a["restart"], a["ended"][:10]) for a in restarted] == [
        (1, 0, "rank 1 on "), (None, 0, "finished")], restarted  # never requeued
    assert "killed by SIGKILL" in restarted[0]["ended"], restarted[0]
    ranks = [json.loads((point / "environment" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len({r["host"] for r in ranks}) == 2 and all(r["threads"] == 1 for r in ranks)


@pytest.mark.timeout(420)
def test_a_point_of_the_stock_launcher_preempted_by_a_higher_tier_job_saves_requeues_once_and_resumes(
        slurm_cluster, tmp_path, data_overrides):
    """The stock plugin's job in partition `low`: a job of `urgent` takes its nodes. Slurm's SIGTERM reaches the ranks
    through submitit's job, they save inside the grace time, the job is requeued once (Slurm's policy, not submitit's
    checkpointing), submitit's watcher follows it through accounting, and the point ends with the uninterrupted run's
    losses, its attempts log naming the preemption."""
    reference = local_reference(tmp_path, data_overrides)

    def meanwhile(sweep: Path) -> tuple[str, str]:
        job = job_of(sweep / "lr0.001", time.monotonic() + 180)
        urgent_job(slurm_cluster, tmp_path)
        return job

    sweep, (job, _) = stock_sweep(slurm_cluster, tmp_path,
                                  ["hydra.launcher.partition=low", "train.lr=0.001", *data_overrides], meanwhile)
    point = sweep / "lr0.001"
    attempts = [json.loads(x) for x in (point / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2 and attempts[1]["ended"] == "finished" and attempts[1]["restart"] == 1, attempts
    assert attempts[0]["ended"].startswith("preempted by job "), attempts[0]
    assert "the run's partition low: PreemptMode=REQUEUE" in attempts[0]["ended"] and attempts[0]["requeued"], attempts[0]
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
    assert losses(point) == losses(reference)  # bitwise, every step once
