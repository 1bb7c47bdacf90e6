"""Inside a rank, the scheduler's side of the job: its id, which attempt this is, and how to run it again.
gpt/ knows no scheduler: on a preemption signal the trainer saves and stops, and the worker asks this object to
requeue. A new backend adds one class here (and its detection in `job_environment`)."""
from __future__ import annotations

import os
from typing import Mapping

from launch import slurm_commands
from launch.slurm_commands import SlurmUnavailable


class JobEnvironment:
    """No scheduler (cluster=local): nothing requeues the run; the same command resumes it."""

    scheduler = "none"

    def __init__(self, environ: Mapping[str, str] | None = None):
        self.environ = dict(os.environ if environ is None else environ)

    @property
    def job_id(self) -> str | None:
        return None

    @property
    def restart(self) -> int:
        return 0

    def variables(self) -> dict[str, str]:
        """The scheduler's variables, recorded in environment/rank<R>.json."""
        return {}

    def requeue(self, max_restarts: int) -> tuple[bool, str]:
        return False, "no scheduler to requeue the run: run the same command to resume it"


class SlurmJob(JobEnvironment):
    scheduler = "slurm"

    @property
    def job_id(self) -> str | None:
        return self.environ.get("SLURM_JOB_ID") or None

    @property
    def restart(self) -> int:
        value = self.environ.get("SLURM_RESTART_COUNT", "0") or "0"
        return int(value) if value.isdigit() else 0

    def variables(self) -> dict[str, str]:
        return {k: v for k, v in self.environ.items() if k.startswith("SLURM_")}

    def requeue(self, max_restarts: int) -> tuple[bool, str]:
        """Ask Slurm to run this job again (same job id), only while it is RUNNING: a job that `scancel`
        cancelled, or that `scontrol requeue` from outside is already requeueing, is left to Slurm."""
        job = self.job_id
        if self.restart >= max_restarts:
            return False, f"restart limit reached ({self.restart} of preemption.max_restarts={max_restarts})"
        try:
            info = slurm_commands.scontrol_job(job)
            if info is not None and info.state != "RUNNING":
                return False, f"job {job} is {info.state}: Slurm decides what happens next"
            slurm_commands.requeue(job)
        except SlurmUnavailable as e:
            return False, f"scontrol requeue {job} failed ({e}): submit the same command again to resume"
        return True, f"requeued job {job} (restart {self.restart + 1} of at most {max_restarts})"


def job_environment(environ: Mapping[str, str] | None = None) -> JobEnvironment:
    env = os.environ if environ is None else environ
    return SlurmJob(env) if env.get("SLURM_JOB_ID") else JobEnvironment(env)
