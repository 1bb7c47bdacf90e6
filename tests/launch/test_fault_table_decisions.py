"""Cells of docs/fault-tolerance.md's table of every interruption against every entry point that no scenario of their
own shows: the launcher's decision, with Slurm's commands stood in for as commands.run calls them (the error path is
the real one)."""
from __future__ import annotations

import json
import subprocess

import pytest

from gpt.errors import UserError
from gpt.run_folder import Next, RunFolder
from launch.backends import scheduler
from launch.backends.slurm import commands
from launch.rank.job_env import JobEnvironment
from launch.recovery.decision import Cause, Ending, recover
from launch.run.identity import check_queued_job


def slurm(answers: dict[str, str]):
    """subprocess.run for commands.run: the commands named answer so, every other one times out (an outage)."""
    def run(cmd, **kw):
        if cmd[0] in answers:
            return subprocess.CompletedProcess(cmd, 0, answers[cmd[0]], "")
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))
    return run


def folder_of_job(tmp_path, job_id: str = "5"):
    (tmp_path / "slurm_job.json").write_text(json.dumps({"job_id": job_id}))
    return tmp_path


def test_a_local_launch_during_a_slurm_outage_goes_on(tmp_path, monkeypatch):
    """cluster=local asks Slurm whether the job its folder records still waits: without an answer that is no job
    (a machine without Slurm never answers either), and the folder's lease, which needs no Slurm, guards a live
    holder. The same question answered PENDING refuses the launch, naming the job."""
    run_dir, ask = folder_of_job(tmp_path), (lambda j: scheduler().job_state(j))
    monkeypatch.setattr(commands.subprocess, "run", slurm({}))
    check_queued_job(run_dir, JobEnvironment({}), ask)
    pending = "JobId=5 JobName=run JobState=PENDING Reason=Priority UserId=me(1000)\n"
    monkeypatch.setattr(commands.subprocess, "run", slurm({"scontrol": pending}))
    with pytest.raises(UserError, match="belongs to job 5, which is PENDING"):
        check_queued_job(run_dir, JobEnvironment({}), ask)
