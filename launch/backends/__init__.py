"""Backends: how a planned point becomes processes. Each is one module (or package) behind `Backend`, named
by `cluster.name` (configs/cluster/<name>.yaml). Kept light: a Slurm task imports this package first thing.

A backend either runs a point here and waits for it (local, srun), or submits it as a job to a scheduler through
its `Queue` (slurm). What a new one (PBS, LSF, ...) implements is written in docs/backends.md. Code outside
launch/backends/ reaches a scheduler only through this interface, the job environment (JOB_ENVIRONMENTS) and
`job_state`.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import ConfigError, UserError
from launch.backends.job_state import JobStanding
from launch.local_gpus import local_gpus

if TYPE_CHECKING:  # launch.launch_config imports this package's cluster_config
    from launch.launch_config import LaunchConfig

REGISTRY = {  # cluster.name -> "module:class"
    "local": "launch.backends.local:LocalBackend",
    "srun": "launch.backends.srun:SrunBackend",
    "slurm": "launch.backends.slurm.backend:SlurmBackend",
}
# A task of a job another Hydra launcher submitted (hydra-submitit-launcher): classes with detect(hydra_cfg) -> bool.
IN_JOB_BACKENDS = ("launch.backends.slurm.in_job:InJobBackend",)
# Inside a rank: each scheduler's launch.rank.job_env.JobEnvironment, tried in order (detect(environ) -> bool).
JOB_ENVIRONMENTS = ("launch.backends.slurm.job:SlurmJob",)
# The backend whose queue holds the jobs a run folder records (RUN_DIR/slurm_job.json): status, list, logs and cancel
# ask it.
SCHEDULER = "slurm"


class RunFailed(UserError):
    """The run was planned and started, and failed (exit code 1, not 2)."""


class RunStopped(Exception):
    """The run's job saved after a preemption and nothing runs it again (its site's preemption cancels it): the waiter
    said so and how the same command continues it; the launcher exits 1, as launch.status for a stopped run."""


@dataclass
class Point:
    """A planned sweep point that a submitting backend turns into a job."""

    label: str  # e.g. "nodes=2"
    run_dir: Path
    job_name: str
    resources: Any  # the backend's own request, from Backend.check


class Queue:
    """What a backend that queues jobs with a scheduler offers (`Backend.queue`), beyond what every backend does:
    submitting a run's or sweep's jobs and following them, a detached launch's jobs, the jobs a run folder records,
    and a rank's evaluation jobs."""

    def live_job(self, run_dir: Path) -> str | None:
        """The job an earlier launch submitted for this run folder, if it still waits or runs: the same command
        waits for it instead of submitting again (refused when it would not go on by itself)."""
        raise NotImplementedError

    def submit_all(self, planned: list, folder: Path, out=sys.stdout) -> tuple[list, Any]:
        """Every planned point's job, in order: picked up when live, else submitted (with the budget, the code
        snapshot and data preparation jobs). Returns the submitted jobs and the snapshot (or None)."""
        raise NotImplementedError

    def wait(self, submitted: list, poll_s: float, progress: bool) -> list:
        """Wait for the submitted jobs, reporting each as it ends; returns their outcomes in order."""
        raise NotImplementedError

    def submit_report(self, sweep_dir: Path, job_ids: list[str], resources: Any, snapshot: Any) -> str:
        """A detached sweep's report job, run once every job has ended; returns its id."""
        raise NotImplementedError

    def submit_search(self, sweep_dir: Path, job_ids: list[str], resources: Any, snapshot: Any, args: list[str],
                      batches: int) -> str:
        """A detached search's job (`python -m launch ARGS`), run once these jobs have ended, long enough for
        `batches` more batches; returns its id (an earlier one's, while it waits or runs)."""
        raise NotImplementedError

    def print_follow_up(self, target: Path, job_ids: list[str], report_job: str | None = None,
                        out=sys.stdout) -> None:
        """What a detached launch prints: the commands that follow its jobs."""
        raise NotImplementedError

    def after_save_hook(self, run: LaunchConfig, run_dir: Path) -> Any:
        """Rank 0's loop hook (gpt.train.hooks.LoopHook) for eval.after_save=job, or None."""
        raise NotImplementedError

    def job_state(self, job_id: str) -> JobStanding | None:
        """Where that job stands, as the scheduler says (None: it cannot tell, and a run folder's lease goes by its
        beat)."""
        raise NotImplementedError

    def standings(self, job_ids: list[str]) -> dict[str, JobStanding]:
        """Every job's standing in one question to the scheduler (launch.status, list, logs, cancel); raises
        launch.backends.job_state.SchedulerUnavailable when the scheduler cannot be asked."""
        raise NotImplementedError

    def cancel(self, job_ids: list[str], signal: str | None = None) -> None:
        """Cancel the jobs, or send their steps `signal` (e.g. USR2) instead; raises SchedulerUnavailable."""
        raise NotImplementedError


class Backend:
    """The interface. `check` runs before anything starts; then `run` (here), or the jobs through `queue`."""

    name = "?"
    queue: Queue | None = None  # a scheduler's: every point is one of its jobs, submitted from here

    def check(self, run: LaunchConfig) -> tuple[LaunchConfig, Any]:
        """Validate what can be checked without running anything, against the real cluster if there is
        one. Returns the run's config (resolved where the backend fills values in) and the resources a submitted
        job asks for (None for backends that run here)."""
        return run, None

    def device(self, run: LaunchConfig) -> str:
        """What the ranks compute on for train.device=auto: "cuda" or "cpu". Here: this machine's GPUs
        (launch.local_gpus)."""
        return "cuda" if local_gpus() else "cpu"

    def device_memory_gib(self, run: LaunchConfig, device: str) -> float | None:
        """GiB of memory one rank's device has, for the planner's fit check: a GPU's, or on a CPU its share of the
        node's memory; None when not known. Here: this machine's (its smallest GPU's). A job whose GPUs this process
        cannot open (sbatch's batch step on a node of a GPU job sees the allocation's GPUs, not always CUDA) knows
        none: the ranks check their own devices."""
        if device == "cuda":
            gpus = local_gpus()
            return min(g.memory_gib for g in gpus) if gpus else None
        import psutil

        return psutil.virtual_memory().total / 2**30 / run.cluster.tasks_per_node

    def preemption_grace_s(self, run: LaunchConfig) -> tuple[int, str] | None:
        """(seconds, where they are set) that the scheduler leaves a preempted job between its signal and the kill,
        for planning's save-time check (launch.planning.save_time); None where its jobs are not preempted or it
        cannot say. Here: a local run is not preempted."""
        return None

    def time_limit_lines(self, run: LaunchConfig, times) -> list[str]:
        """One line for each way the job's time limit leaves too little to train, given what an attempt spends
        (`times`: launch.planning.time_limit.AttemptTimes), for planning's time-limit check. Here: no time limit."""
        return []

    def run(self, plan) -> Any:
        """Run one planned point here and return when it has finished (backends without a queue): the job
        environment its ranks ran in (a launch.rank.job_env.JobEnvironment, their launch's id included), which the
        launcher asks how the attempt ended."""
        raise NotImplementedError


def scheduler() -> Queue:
    """The queue that answers for the jobs recorded in run folders."""
    return get_backend(SCHEDULER).queue


def in_a_submitted_task(hydra_cfg) -> bool:
    """Whether this process is a task of a job another Hydra launcher submitted: each task of it plans the run it is
    a rank of, all at once by design (no launch lock between them: launch.run.launch_lock)."""
    return any(cls.detect(hydra_cfg) for cls in map(_load, IN_JOB_BACKENDS))


def backend_for(name: object, hydra_cfg) -> Backend:
    """`cluster.name`'s backend, or in a task of a job another Hydra launcher submitted, the one that makes this task
    a rank of it."""
    for cls in map(_load, IN_JOB_BACKENDS):
        if cls.detect(hydra_cfg):
            return cls()
    return get_backend(name)


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def get_backend(name: object) -> Backend:
    if name not in REGISTRY:
        raise ConfigError("cluster.name", name, f"one of {', '.join(REGISTRY)} (cluster=local|slurm|srun)")
    return _load(REGISTRY[str(name)])()

