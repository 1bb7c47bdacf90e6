"""A preemption that comes while the tasks start. Slurm signals every process of the job's steps, and a task that
does not ignore SIGTERM yet dies of it: slurmstepd's child before its exec, a site's task prolog, the shell before its
trap (launch.backends.slurm.step.ignoring). srun then ends with no rank having seen the preemption, and Slurm does not
requeue a job that ends inside its grace time. So after srun fails, the batch step asks this module (cluster=slurm:
the batch script's teardown; cluster=srun: srun's launcher): when Slurm preempts the job and no process recorded this
attempt, it is recorded as preempted and the site's policy applied (launch.recovery.decision: REQUEUE requeues the job).

    python -m launch.backends.slurm.start_preempted SUBMITIT_FOLDER   # in the batch script, after srun failed
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from launch import launch_config
from gpt.run_folder import RunFolder
from launch.rank.job_env import ROUND_VAR, JobEnvironment, job_environment
from launch.run.attempts import this_attempts_line
from launch.recovery.decision import Cause, Ending, Outcome, recover
from launch.recovery.packed import recover_allocation
from launch.recovery.rounds import Rounds


def after_failed_step(run_dir: Path, job: JobEnvironment) -> Outcome | None:
    """The outcome of a preemption no rank recorded (the line says it, and the job is requeued where Slurm's
    policy requeues); None when Slurm preempts nothing, or a rank recorded the attempt itself. The attempt is its
    newest round: one asked for inside the allocation (launch.recovery.rounds) may have been starting."""
    if k := Rounds.of(run_dir, job).newest():
        job = type(job)({**job.environ, ROUND_VAR: str(k)})
    preempted = job.preemption()
    if preempted is None or this_attempts_line(run_dir, job) is not None:
        return None
    restarts = launch_config.load(RunFolder(run_dir).config).preemption.max_restarts
    outcome = recover(Ending(run_dir, job, Cause.PREEMPTED, preempted.said, restarts,
                             record={"preempted_by": preempted.said}))
    print(f"{preempted.said} while the tasks started, before any rank could save; {outcome.note}", file=sys.stderr,
          flush=True)
    return outcome


def after_failed_pack(run_dirs: list[Path], job: JobEnvironment) -> Outcome | None:
    """A packed allocation's one task (launch.backends.slurm.pack_task) killed as it started, before its signal
    relay: it started no point, so none recorded this attempt, and recovery decides for the allocation as the task
    would have (launch.recovery.packed: a requeue where Slurm's policy requeues). None when Slurm preempts nothing, or
    the task decided itself (it claimed the allocation's attempt first)."""
    preempted = job.preemption()
    if preempted is None or (outcome := recover_allocation(run_dirs, job)) is None:
        return None
    print(f"packed job, killed as its task started: {outcome.note}", file=sys.stderr, flush=True)  # says by whom
    return outcome


def main() -> None:
    from submitit.core.utils import DelayedSubmission, JobPaths

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue signals the batch step too: the line comes first
    job = job_environment()
    task = DelayedSubmission.load(JobPaths(Path(sys.argv[1]), job.job_id).submitted_pickle).function
    if getattr(task, "run_dir", None):
        after_failed_step(Path(task.run_dir), job)
    elif getattr(task, "run_dirs", None):  # a packed job: its points have run folders of their own
        after_failed_pack([Path(d) for d in task.run_dirs], job)


if __name__ == "__main__":
    main()
