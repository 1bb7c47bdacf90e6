"""Inside a rank, the job environment is the only thing that knows the scheduler."""
from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import REPO
from launch.backends.slurm.job import SlurmJob
from launch.job_env import JobEnvironment, job_environment


def test_the_scheduler_is_detected_from_its_variables():
    assert type(job_environment({})) is JobEnvironment
    job = job_environment({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3", "SLURM_NNODES": "2", "HOME": "/h"})
    assert isinstance(job, SlurmJob) and (job.job_id, job.restart) == ("42", 3)
    assert job.variables() == {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3", "SLURM_NNODES": "2"}


def test_requeue_stops_at_the_restart_limit_without_asking_slurm():
    job = SlurmJob({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"})
    assert job.requeue(max_restarts=2) == (False, "restart limit reached (2 of preemption.max_restarts=2)")
    requeued, why = JobEnvironment({}).requeue(max_restarts=5)
    assert not requeued and "run the same command" in why


def test_requeue_without_slurm_commands_says_how_to_resume(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    requeued, why = SlurmJob({"SLURM_JOB_ID": "42"}).requeue(max_restarts=5)
    assert not requeued and "submit the same command again" in why


def test_gpt_knows_no_scheduler():
    found = subprocess.run(["grep", "-rnE", "scontrol|SLURM_|squeue|sbatch", str(REPO / "gpt")],
                           capture_output=True, text=True).stdout
    assert found == "", found
    assert not list(Path(REPO / "gpt").rglob("*slurm*"))


def test_a_late_requeue_leaves_the_next_attempt_alone(monkeypatch):
    """A rank of attempt 0 that asks only after its job runs again (it was cut off) must not requeue restart 1."""
    from launch.backends.slurm import commands

    asked = []
    monkeypatch.setattr(commands, "scontrol_job", lambda job: commands.JobInfo(job, "RUNNING", "",
                                                                               (("Restarts", "1"),)))
    monkeypatch.setattr(commands, "requeue", asked.append)
    requeued, why = SlurmJob({"SLURM_JOB_ID": "42"}).requeue(max_restarts=5)
    assert (requeued, why, asked) == (True, "requeued by Slurm or by another rank already (job 42 is on restart 1)", [])
