"""The end of a packed allocation (launcher.pack): one job whose one task runs several points, each in its own run
folder, each point's ranks recording their own attempt and leaving the allocation's fate to the packer. When the
allocation ends before every point finished, recovery decides once for all of it, by the rules of one run's end
(launch.recovery.decision.decide): the user's cancel stops it (no point runs again; each records its own cancel), a
preemption, a time limit's warning or a point that saved and asked for it requeues it, as preemption.max_restarts
and the site's policy allow. One process decides, the first to claim the allocation's attempt: the packer's task,
or the batch step when that task was killed as it started (launch.backends.slurm.start_preempted). The backend
carries the outcome out."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gpt.run_folder import RunFolder
from launch import launch_config
from launch.rank.job_env import JobEnvironment
from launch.recovery.decision import Cause, Ending, Outcome, decide
from launch.run.attempts import this_attempt
from launch.run.job_record import CANCELLED, cancel_requested


def allocation_ending(run_dirs: Sequence[Path], job: JobEnvironment) -> Ending:
    """Why the allocation ends early: the user cancelled it (launch.cancel asked in any of its points' folders, or
    scancel), else it is preempted (Slurm says by whom, or a signal did: a time limit's warning)."""
    points = tuple(run_dirs)
    restarts = launch_config.load(RunFolder(points[0]).config).preemption.max_restarts
    if any(cancel_requested(d, job.job_id) for d in points) or job.cancelled():
        return Ending(points[0], job, Cause.CANCELLED, CANCELLED, restarts, points=points)
    if (by := job.preemption()) is not None:
        return Ending(points[0], job, Cause.PREEMPTED, by.said, restarts, record={"preempted_by": by.said},
                      points=points)
    return Ending(points[0], job, Cause.PREEMPTED, "preempted", restarts, points=points)


def recover_allocation(run_dirs: Sequence[Path], job: JobEnvironment) -> Outcome | None:
    """The one outcome for the allocation, by the process that claims its attempt (None for any other). It writes
    no line: each point's ranks wrote their own."""
    end = allocation_ending(run_dirs, job)
    try:
        mine = RunFolder(end.run_dir).attempts.claim(f"{this_attempt(job)}-allocation")
    except OSError:  # the storage fails: decide anyway (the requeue comes first)
        mine = True
    if not mine:
        return None
    return decide(end, None, [])
